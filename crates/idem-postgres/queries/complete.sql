-- Completes the in-flight record $1 held by token $2 with response $3, and notifies
-- waiters in every replica at commit. Returns how many rows changed and the current token.
WITH clock AS (
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now
),
done AS (
    UPDATE {{table}} AS r
    SET state = 1, response = $3, settled_at = c.now, expires_at = c.now + r.retention,
        holder = NULL
    FROM clock c
    WHERE r.id = $1 AND r.token = $2 AND r.state = 0 AND r.expires_at > c.now
    RETURNING r.id
),
notified AS (
    SELECT pg_notify('{{channel}}', encode(id, 'hex')) FROM done
)
SELECT (SELECT count(*) FROM notified) AS changed,
       (SELECT r.token FROM {{table}} r, clock c WHERE r.id = $1 AND r.expires_at > c.now)
           AS current
