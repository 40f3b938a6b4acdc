-- One record by id, live or expired: the caller decides.
SELECT id, fingerprint, token, state, lease_until, retention_ms, expires_at,
       completed_at, released_at, response
FROM records
WHERE id = ?1
