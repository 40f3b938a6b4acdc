-- The rows of ids $1 that a claim with holder nonce $2 wrote, if it is still that claim's: resolves a claim
-- whose answer was lost with its connection.
SELECT r.id, r.fingerprint, r.token, r.state, r.lease_until, r.retention, r.expires_at,
       r.settled_at, r.response, r.taken_over_token, r.taken_over_lease_until
FROM {{table}} r
WHERE r.id = ANY($1::bytea[]) AND r.holder = $2 AND r.state = 0
