-- Deletes up to $1 expired records, skipping rows other sessions hold locked, so a purge
-- never waits on (or blocks) a claim.
DELETE FROM {{table}}
WHERE ctid IN (
    SELECT ctid FROM {{table}}
    WHERE expires_at <= (extract(epoch FROM clock_timestamp()) * 1000)::bigint
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
RETURNING id
