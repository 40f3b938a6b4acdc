-- Claims a set of distinct record ids in one statement, taking over the rows that may be
-- taken over, under their locks: the store runs it for the rows claim_first.sql found so.
-- Rows the claim took come back with claimed = true; for the others the current row comes
-- back (claimed = false), as a concurrent claim may have taken one first.
-- $1 ids, $2 fingerprints, $3 leases (ms), $4 retentions (ms), $5 holder nonces.
--
-- Run unprepared (the store uses query_typed), so the server plans it for the arrays and the
-- table as they are: a plan cached for later runs was made for some table size and array
-- length, and one made while the table was small scanned the whole table once it had grown.
WITH clock AS (
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now
),
input AS (
    SELECT *
    FROM unnest($1::bytea[], $2::bytea[], $3::bigint[], $4::bigint[], $5::bytea[])
        AS i(id, fingerprint, lease, retention, holder)
),
claimed AS (
    INSERT INTO {{table}} AS r
        (id, fingerprint, token, state, lease_until, retention, expires_at,
         settled_at, response, holder, taken_over_token, taken_over_lease_until)
    SELECT i.id, i.fingerprint, GREATEST(1, c.now * 1000), 0, c.now + i.lease, i.retention,
           c.now + i.lease + i.retention, NULL, NULL, i.holder, NULL, NULL
    FROM input i CROSS JOIN clock c
    ORDER BY i.id
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
WHERE r.id = ANY($1::bytea[]) AND r.id NOT IN (SELECT id FROM claimed)
