-- Deletes up to ?2 records that expired at or before ?1, oldest first, and returns their ids
-- so that their waiters can be woken.
DELETE FROM records
WHERE rowid IN (
    SELECT rowid FROM records WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2
)
RETURNING id
