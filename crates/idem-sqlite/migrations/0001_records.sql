-- Schema version 1: the records table.
--
-- One row per record id. Times (`lease_until`, `expires_at`, `completed_at`, `released_at`)
-- are milliseconds since the Unix epoch; `retention_ms` is a duration in milliseconds.
-- `state`: 1 in flight, 2 completed, 3 released (a tombstone that keeps the token).
--
-- A rowid table, not WITHOUT ROWID: responses can be 1 MiB and more, and a rowid table keeps
-- them out of the id index, which stays small and dense.
CREATE TABLE records (
    id           BLOB    NOT NULL UNIQUE CHECK (length(id) = 32),
    fingerprint  BLOB    NOT NULL CHECK (length(fingerprint) = 32),
    token        INTEGER NOT NULL CHECK (token >= 0),
    state        INTEGER NOT NULL CHECK (state IN (1, 2, 3)),
    lease_until  INTEGER,
    retention_ms INTEGER NOT NULL CHECK (retention_ms >= 0),
    expires_at   INTEGER NOT NULL,
    completed_at INTEGER,
    released_at  INTEGER,
    response     BLOB
) STRICT;

-- The purge deletes expired records in expiry order.
CREATE INDEX records_expires_at ON records (expires_at);
