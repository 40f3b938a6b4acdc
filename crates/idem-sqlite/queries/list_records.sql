-- Live records (expiring after ?1) in ascending id order, optionally in one state (?2) and
-- after an id (?3, the empty blob for "from the start": it sorts before every id).
SELECT id, fingerprint, token, state, lease_until, retention_ms, expires_at,
       completed_at, released_at, response
FROM records
WHERE id > ?3
  AND expires_at > ?1
  AND (?2 IS NULL OR state = ?2)
ORDER BY id
LIMIT ?4
