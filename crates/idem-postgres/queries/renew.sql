-- Extends the lease of record $1 held by token $2 to at least now + $3 ms.
WITH clock AS (
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now
),
done AS (
    UPDATE {{table}} AS r
    SET lease_until = GREATEST(r.lease_until, c.now + $3),
        expires_at = GREATEST(r.lease_until, c.now + $3) + r.retention
    FROM clock c
    WHERE r.id = $1 AND r.token = $2 AND r.state = 0 AND r.expires_at > c.now
    RETURNING r.lease_until
)
SELECT (SELECT lease_until FROM done) AS lease_until,
       (SELECT r.token FROM {{table}} r, clock c WHERE r.id = $1 AND r.expires_at > c.now)
           AS current
