-- Completes a batch of distinct in-flight records, each held by its token, with its response,
-- and notifies waiters in every replica at commit (one notification per record, as
-- complete.sql sends). One row per input id: whether it changed, and the current token.
-- $1 ids, $2 tokens, $3 responses. Run unprepared (query_typed), as claim.sql is, and for the
-- same reason: a cached plan made while the table was small joins by scanning the table.
WITH clock AS (
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now
),
input AS (
    SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bytea[]) AS i(id, token, response)
),
done AS (
    UPDATE {{table}} AS r
    SET state = 1, response = i.response, settled_at = c.now, expires_at = c.now + r.retention,
        holder = NULL
    FROM input i, clock c
    WHERE r.id = ANY($1::bytea[]) AND r.id = i.id AND r.token = i.token AND r.state = 0
      AND r.expires_at > c.now
    RETURNING r.id
),
notified AS (
    SELECT pg_notify('{{channel}}', encode(id, 'hex')) FROM done
)
SELECT i.id,
       EXISTS (SELECT 1 FROM done d WHERE d.id = i.id) AS changed,
       (SELECT r.token FROM {{table}} r, clock c WHERE r.id = i.id AND r.expires_at > c.now)
           AS current,
       (SELECT count(*) FROM notified) AS notified
FROM input i
