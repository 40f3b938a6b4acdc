-- The live record $1.
SELECT r.id, r.fingerprint, r.token, r.state, r.lease_until, r.retention, r.expires_at,
       r.settled_at, r.response, r.taken_over_token, r.taken_over_lease_until
FROM {{table}} r
WHERE r.id = $1
  AND r.expires_at > (extract(epoch FROM clock_timestamp()) * 1000)::bigint
