#!/usr/bin/env bash
# The PostgreSQL store's single-claim statement, current against a baseline revision's, and
# against a bare insert: statements per second under pgbench, on fresh ids and on replays.
#
#   bench/stores/pg_statements.sh [--baseline REV] [--seconds S] [--rounds R] [--clients N]
#
# Starts a server of its own (`scripts/pg-server start DIR --fsync`: fsync and
# synchronous_commit on, as in production), creates the store's table from its migration,
# and turns `crates/idem-postgres/queries/claim_one.sql` of the working tree and of REV
# (default HEAD~1) into pgbench scripts (parameters inlined: an id from a random number, a
# fixed fingerprint and holder, lease and retention of 60 s), as bench/stores/run.sh does.
# Then, in R rounds (default 3) of S seconds (default 8) with N clients (default 16):
#
# - fresh ids: bench/stores/insert_on_conflict.sql (the raw engine's equivalent write), the
#   baseline's statement, the current one, each on an emptied table (TRUNCATE, CHECKPOINT);
# - replays: both statements on a table of 100,000 completed records (a 300-byte
#   response each), ids drawn from those.
#
# Prints a Markdown table: median rates, and the median (and range) of each round's ratio.
set -euo pipefail
cd "$(dirname "$0")/../.."

baseline=HEAD~1
seconds=8
rounds=3
clients=16
while [ $# -gt 0 ]; do
  case "$1" in
    --baseline) baseline=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    *) echo "usage: $0 [--baseline REV] [--seconds S] [--rounds R] [--clients N]" >&2; exit 64 ;;
  esac
done

log() { printf '%s\n' "$*" >&2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/idem-pg-statements.XXXXXX")
chmod 755 "$work"
cleanup() {
  scripts/pg-server stop "$work/pg" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

eval "$(scripts/pg-server start "$work/pg" --fsync)"
port=$(cat "$work/pg/port")
psql_() { psql -q -X -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }
sed -e 's/{{table}}/idem_records/g' -e 's/{{index_prefix}}/idem_records/g' \
  crates/idem-postgres/migrations/0001_records.sql | psql_ -f -
psql_ -c 'CREATE TABLE raw_claims (LIKE idem_records INCLUDING ALL)'

fingerprint=$(printf 'ab%.0s' $(seq 32))
# shellcheck source=bench/stores/pgbench_claim.sh
. bench/stores/pgbench_claim.sh
for version in baseline current; do
  if [ "$version" = baseline ]; then
    sql=$(git show "$baseline:crates/idem-postgres/queries/claim_one.sql")
  else
    sql=$(cat crates/idem-postgres/queries/claim_one.sql)
  fi
  pgbench_claim 1000000000000000 <<<"$sql" >"$work/$version.sql"
  pgbench_claim 100000 <<<"$sql" >"$work/$version-replay.sql"
done

rate() {
  pgbench -h 127.0.0.1 -p "$port" -U postgres -n -M prepared -c "$clients" -j $((clients < 2 ? clients : 2)) \
    -T "$seconds" -f "$1" postgres 2>/dev/null | awk '/^tps/ { printf "%.0f", $3 }'
}
empty() { psql_ -c 'TRUNCATE idem_records, raw_claims' -c 'CHECKPOINT'; }
completed() {
  psql_ -c 'TRUNCATE idem_records' -c "INSERT INTO idem_records
    SELECT sha256(i::text::bytea), '\\x$fingerprint'::bytea, 1, 1, 0, 86400000,
           (extract(epoch FROM now()) * 1000)::bigint + 86400000, 0,
           repeat('r', 300)::bytea, '\\x00'::bytea, NULL, NULL
    FROM generate_series(1, 100000) i" -c 'VACUUM ANALYZE idem_records' -c 'CHECKPOINT'
}

raw="" base="" cur="" base_r="" cur_r=""
for r in $(seq 1 "$rounds"); do
  empty; x=$(rate bench/stores/insert_on_conflict.sql); raw="$raw $x"; log "round $r: bare insert $x/s"
  empty; x=$(rate "$work/baseline.sql"); base="$base $x"; log "round $r: baseline, fresh ids $x/s"
  empty; x=$(rate "$work/current.sql"); cur="$cur $x"; log "round $r: current, fresh ids $x/s"
  completed
  x=$(rate "$work/baseline-replay.sql"); base_r="$base_r $x"; log "round $r: baseline, replays $x/s"
  x=$(rate "$work/current-replay.sql"); cur_r="$cur_r $x"; log "round $r: current, replays $x/s"
done

summary() {
  awk -v label="$1" -v A="$2" -v B="$3" '
    function median(a, n,   i, j, t) {
      for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    BEGIN {
      n = split(A, a, " "); split(B, b, " ")
      lo = hi = a[1] / b[1]
      for (i = 1; i <= n; i++) { q[i] = a[i] / b[i]; if (q[i] < lo) lo = q[i]; if (q[i] > hi) hi = q[i] }
      for (i = 1; i <= n; i++) { a2[i] = a[i]; b2[i] = b[i] }
      printf "| %s | %.0f | %.0f | %.2f× (%.2f–%.2f) |\n", label, median(a2, n), median(b2, n), median(q, n), lo, hi
    }'
}

echo "PostgreSQL $(psql_ -Atc 'SHOW server_version'), fsync on, $clients clients, $rounds rounds of ${seconds}s; baseline $baseline."
echo
echo "| statement | statements/s | against /s | ratio |"
echo "|---|---|---|---|"
summary "baseline claim_one.sql, fresh ids ÷ bare insert" "$base" "$raw"
summary "current claim_one.sql, fresh ids ÷ bare insert" "$cur" "$raw"
summary "current ÷ baseline, fresh ids" "$cur" "$base"
summary "current ÷ baseline, replays" "$cur_r" "$base_r"
