-- The rows of ids $1 that claims with holder nonces $2 (one per id) wrote, if they are still
-- those claims': resolves claims whose answer was lost with their connection.
SELECT r.id, r.fingerprint, r.token, r.state, r.lease_until, r.retention, r.expires_at,
       r.settled_at, r.response, r.taken_over_token, r.taken_over_lease_until
FROM {{table}} r
JOIN unnest($1::bytea[], $2::bytea[]) AS l(id, holder) ON r.id = l.id AND r.holder = l.holder
WHERE r.state = 0
