-- Deletes record $1 whatever its state (an operator's purge) and notifies its waiters.
WITH gone AS (
    DELETE FROM {{table}} WHERE id = $1 RETURNING id
)
SELECT count(pg_notify('{{channel}}', encode(id, 'hex'))) AS removed FROM gone
