-- Writes a record as the state machine left it, replacing any previous row of the id.
INSERT INTO records (id, fingerprint, token, state, lease_until, retention_ms, expires_at,
                     completed_at, released_at, response)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
ON CONFLICT (id) DO UPDATE SET
    fingerprint  = excluded.fingerprint,
    token        = excluded.token,
    state        = excluded.state,
    lease_until  = excluded.lease_until,
    retention_ms = excluded.retention_ms,
    expires_at   = excluded.expires_at,
    completed_at = excluded.completed_at,
    released_at  = excluded.released_at,
    response     = excluded.response
