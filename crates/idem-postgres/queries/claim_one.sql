-- Claims one record id that has no row, else reads the row it has: one statement, one round
-- trip, for the common cases. The row comes back with claimed = true if the insert took the
-- id; otherwise the current row as a plain read (claimed = false), with the server's time.
-- $1 id, $2 fingerprint, $3 lease (ms), $4 retention (ms), $5 holder nonce.
--
-- The store answers from a row it did not take when the row is a replay, a lease in flight
-- or a mismatch: the read takes no lock and writes nothing, so such an answer costs no
-- commit. Only when the row may be taken over (expired, released, or in flight with the
-- same fingerprint and a lease that passed) does the store run take_over_one.sql, which
-- decides again under the row's lock. No row at all means the id's row appeared after this
-- statement's snapshot; the store claims again.
--
-- Scalars rather than claim.sql's arrays: a generic plan cannot know an array's length,
-- estimates several rows and so looks costlier than a custom plan, and the server then
-- plans a statement with arrays anew at every execution, which costs about as much as
-- running it. With scalars the generic plan is as good as any custom one, and the server
-- plans this statement once per connection.
WITH claimed AS (
    INSERT INTO {{table}} AS r
        (id, fingerprint, token, state, lease_until, retention, expires_at,
         settled_at, response, holder, taken_over_token, taken_over_lease_until)
    SELECT $1::bytea, $2::bytea, GREATEST(1, c.now * 1000), 0, c.now + $3::bigint,
           $4::bigint, c.now + $3::bigint + $4::bigint, NULL, NULL, $5::bytea, NULL, NULL
    FROM (SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now) c
    ON CONFLICT (id) DO NOTHING
    RETURNING r.id, r.fingerprint, r.token, r.state, r.lease_until, r.retention, r.expires_at,
              r.settled_at, r.response, r.taken_over_token, r.taken_over_lease_until,
              r.lease_until - $3::bigint AS now
)
SELECT true AS claimed, k.* FROM claimed k
UNION ALL
SELECT false, r.id, r.fingerprint, r.token, r.state, r.lease_until, r.retention, r.expires_at,
       r.settled_at, r.response, r.taken_over_token, r.taken_over_lease_until,
       (extract(epoch FROM clock_timestamp()) * 1000)::bigint
FROM {{table}} r
WHERE r.id = $1::bytea AND NOT EXISTS (SELECT 1 FROM claimed)
