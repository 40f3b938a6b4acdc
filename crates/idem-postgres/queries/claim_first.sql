-- Claims the ids of a batch that have no row, and reads the rows of the others, in one
-- statement: claim_one.sql for a set of distinct ids. Rows the insert took come back with
-- claimed = true; for the others the current row comes back as a plain read (claimed =
-- false), which answers a replay, a lease in flight or a mismatch without a lock or a
-- write. The store runs claim.sql, which decides again under the rows' locks, only for the
-- rows that may be taken over; an id with no row at all appeared after this statement's
-- snapshot, and is claimed again.
-- $1 ids, $2 fingerprints, $3 leases (ms), $4 retentions (ms), $5 holder nonces.
--
-- Run unprepared, as claim.sql is (it says why).
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
    ON CONFLICT (id) DO NOTHING
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
