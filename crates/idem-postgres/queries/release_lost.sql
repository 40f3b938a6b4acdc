-- Releases the records still held by claims whose outcome was lost (see
-- idem_core::lost): $1 ids, $2 the holder nonce of each id's lost claim. A record is
-- released only if it is in flight under that nonce, so only a lost claim's own; and only
-- if that claim took a record that was free (no taken-over token): a record it took over
-- from an earlier attempt stays in flight, as that attempt's outcome is still unknown.
-- Returns the ids released with the holder nonce each was released from; notifies their
-- waiters at commit.
WITH clock AS (
    SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS now
),
lost AS (
    SELECT * FROM unnest($1::bytea[], $2::bytea[]) AS l(id, holder)
),
-- The rows are locked in id order, as the batch claims lock theirs, so that the two cannot
-- deadlock; the update then checks each row again.
locked AS (
    SELECT r.id
    FROM {{table}} r JOIN lost l ON r.id = l.id AND r.holder = l.holder
    WHERE r.state = 0 AND r.taken_over_token IS NULL
    ORDER BY r.id
    FOR UPDATE OF r
),
done AS (
    UPDATE {{table}} AS r
    SET state = 2, response = NULL, settled_at = c.now, expires_at = c.now + r.retention,
        holder = NULL
    FROM clock c, lost l, locked k
    WHERE r.id = k.id AND r.id = l.id AND r.holder = l.holder AND r.state = 0
      AND r.taken_over_token IS NULL AND r.expires_at > c.now
    RETURNING r.id, l.holder
)
SELECT d.id, d.holder, pg_notify('{{channel}}', encode(d.id, 'hex')) FROM done d
