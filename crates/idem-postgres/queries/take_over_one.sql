-- Claims one record id whose row claim_one.sql found may be taken over: claim.sql for a
-- single id, with scalar parameters (claim_one.sql says why). The row comes back with
-- claimed = true if the claim took it; otherwise the current row (claimed = false), as a
-- concurrent claim may have taken it first: the statement decides again under the row's
-- lock, so two replicas never both take it over.
-- $1 id, $2 fingerprint, $3 lease (ms), $4 retention (ms), $5 holder nonce.
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
