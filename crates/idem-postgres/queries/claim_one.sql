-- Claims one record id: claim.sql for a single id, with scalar parameters. The row comes back
-- with claimed = true if the claim took it; otherwise the current row (claimed = false).
-- $1 id, $2 fingerprint, $3 lease (ms), $4 retention (ms), $5 holder nonce.
--
-- Why not claim.sql with one-element arrays: a generic plan cannot know an array's length,
-- estimates several rows and so looks costlier than a custom plan, and the server then plans
-- claim.sql anew at every execution, which costs about as much as running it. With scalars
-- the generic plan is as good as any custom one, and the server plans this statement once
-- per connection. The current row is read only when the insert took nothing.
--
-- The ON CONFLICT ... RETURNING clause is the same as claim.sql's (a unit test checks it).
WITH clock AS (
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now
),
claimed AS (
    INSERT INTO {{table}} AS r
        (id, fingerprint, token, state, lease_until, retention, expires_at,
         settled_at, response, holder, taken_over_token, taken_over_lease_until)
    SELECT $1::bytea, $2::bytea, GREATEST(1, c.now * 1000), 0, c.now + $3::bigint,
           $4::bigint, c.now + $3::bigint + $4::bigint, NULL, NULL, $5::bytea, NULL, NULL
    FROM clock c
    ON CONFLICT (id) DO UPDATE SET
        fingerprint = EXCLUDED.fingerprint,
        token = GREATEST(r.token + 1, EXCLUDED.token),
        state = 0,
        lease_until = EXCLUDED.lease_until,
        retention = EXCLUDED.retention,
        expires_at = EXCLUDED.expires_at,
        settled_at = NULL,
        response = NULL,
        holder = EXCLUDED.holder,
        taken_over_token =
            CASE WHEN r.state = 0 AND r.expires_at > (SELECT now FROM clock) THEN r.token END,
        taken_over_lease_until =
            CASE WHEN r.state = 0 AND r.expires_at > (SELECT now FROM clock) THEN r.lease_until END
    WHERE r.expires_at <= (SELECT now FROM clock)
       OR r.state = 2
       OR (r.state = 0
           AND r.fingerprint = EXCLUDED.fingerprint
           AND r.lease_until <= (SELECT now FROM clock))
    RETURNING r.id, r.fingerprint, r.token, r.state, r.lease_until, r.retention, r.expires_at,
              r.settled_at, r.response, r.taken_over_token, r.taken_over_lease_until
)
SELECT true AS claimed, k.*, (SELECT now FROM clock) AS now FROM claimed k
UNION ALL
SELECT false, r.id, r.fingerprint, r.token, r.state, r.lease_until, r.retention, r.expires_at,
       r.settled_at, r.response, r.taken_over_token, r.taken_over_lease_until,
       (SELECT now FROM clock)
FROM {{table}} r
WHERE r.id = $1::bytea AND NOT EXISTS (SELECT 1 FROM claimed)
