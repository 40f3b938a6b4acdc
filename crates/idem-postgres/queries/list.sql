-- Live records in id order: $1 state filter (NULL for all), $2 ids after (NULL for the
-- start), $3 page size.
SELECT r.id, r.fingerprint, r.token, r.state, r.lease_until, r.retention, r.expires_at,
       r.settled_at, r.response, r.taken_over_token, r.taken_over_lease_until
FROM {{table}} r
WHERE r.expires_at > (extract(epoch FROM clock_timestamp()) * 1000)::bigint
  AND ($1::smallint IS NULL OR r.state = $1)
  AND ($2::bytea IS NULL OR r.id > $2)
ORDER BY r.id
LIMIT $3
