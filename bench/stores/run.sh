#!/usr/bin/env bash
# Shared stores against their raw engines: claims per second of idem's PostgreSQL and Redis
# stores, against the engine's own benchmark tool doing the equivalent single write, at the
# same concurrency, against the very same server, in the same run.
#
#   bench/stores/run.sh [--seconds S] [--rounds R] [--concurrency "1 16 64 128"]
#                       [--engines "postgres redis cluster"]
#                       [--redis-appendfsync always|everysec]
#
# - postgres: a server of its own started with `scripts/pg-server start DIR --fsync` (fsync
#   on, synchronous_commit on). Raw engine: `pgbench -M prepared -c N -j min(N,2) -T S -f
#   bench/stores/insert_on_conflict.sql` into `raw_claims`, a table created LIKE the store's
#   `idem_records` (same columns, same indexes). Store: the `postgres_claims` example (one
#   claim in flight per task, N tasks) with the store's default pool of 16 connections, the
#   gateway's; and, where N is larger, with a pool of N connections too, as pgbench opens N
#   connections.
# - redis / cluster: servers of their own from `scripts/redis-servers` (no persistence, or
#   the append-only file with --redis-appendfsync). Raw engine: `redis-benchmark -c N -P 1
#   -r 100000000 SET key:__rand_int__ val NX PX 60000` (with --cluster, the key is
#   `key:{tag}:__rand_int__`, so each client's keys live on its node). Store: the
#   `redis_claims` example.
#
# A third column splits the gap: the raw engine's own tool running idem's claim itself
# (pgbench with the store's single-claim statement, `claim_one.sql`; redis-benchmark with
# `EVALSHA` of `claim.lua`), on fresh ids. Store ÷ that is the client's share (driver,
# runtime, pool); that ÷ raw is the statement's or script's share on the server.
#
# Each (engine, concurrency) pair is measured in R rounds (default 3) of back-to-back runs
# (raw engine, raw engine running idem's claim, store), each on emptied tables (PostgreSQL:
# TRUNCATE and CHECKPOINT) or an emptied keyspace (FLUSHALL). The table printed on stdout
# has the median rates, and for each ratio the median and range of the rounds' ratios;
# every single measurement goes to stderr. The machine is shared: compare the ratios, which
# are measured side by side, not absolute numbers across runs.
#
# POSTGRES_CLAIMS and REDIS_CLAIMS name other builds of the store drivers (to measure an
# older version of a store against the same baseline).
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=10
rounds=3
concurrency="1 16 64 128"
engines="postgres redis cluster"
appendfsync=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --engines) engines=$2; shift 2 ;;
    --redis-appendfsync) appendfsync=$2; shift 2 ;;
    *) echo "usage: $0 [--seconds S] [--rounds R] [--concurrency LIST] [--engines LIST] [--redis-appendfsync always|everysec]" >&2; exit 64 ;;
  esac
done

log() { printf '%s\n' "$*" >&2; }
# shellcheck source=bench/stores/pgbench_claim.sh
. bench/stores/pgbench_claim.sh

work=$(mktemp -d "${TMPDIR:-/tmp}/idem-bench-stores.XXXXXX")
chmod 755 "$work"
cleanup() {
  scripts/pg-server stop "$work/pg" >/dev/null 2>&1 || true
  scripts/redis-servers stop "$work/redis" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

log "building the store drivers (release)"
cargo build --release -q -p idem-postgres --example postgres_claims
cargo build --release -q -p idem-redis --example redis_claims
pg_claims=${POSTGRES_CLAIMS:-target/release/examples/postgres_claims}
redis_claims=${REDIS_CLAIMS:-target/release/examples/redis_claims}

# One result row: engine, concurrency, then the store's, the raw engine's and the raw
# engine-running-idem's-claim samples, in round order. Rates are medians; ratios are the
# median (and range) of each round's ratio, as each round's measurements ran back to back
# while the machine's load drifts between rounds.
rows=()
row() {
  rows+=("$(awk -v e="$1" -v c="$2" -v S="$3" -v R="$4" -v K="$5" '
    function median(a, n,   i, j, t) {
      for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function ratios(x, y, n, out,   i, lo, hi) {
      lo = hi = x[1] / y[1]
      for (i = 1; i <= n; i++) { out[i] = x[i] / y[i]; if (out[i] < lo) lo = out[i]; if (out[i] > hi) hi = out[i] }
      return sprintf("%.2f× (%.2f–%.2f)", median(out, n), lo, hi)
    }
    BEGIN {
      n = split(S, s, " "); split(R, r, " "); split(K, k, " ")
      rs = ratios(s, r, n, q1); ks = ratios(s, k, n, q2); kr = ratios(k, r, n, q3)
      for (i = 1; i <= n; i++) { s2[i] = s[i]; r2[i] = r[i]; k2[i] = k[i] }
      printf "| %s | %d | %.0f | %.0f | **%s** | %.0f | %s | %s |", e, c, median(s2, n), median(r2, n), rs, median(k2, n), ks, kr
    }')")
}

store_rate() { awk '/^claims\/s/ { print $2 }'; }

if [[ " $engines " == *" postgres "* ]]; then
  eval "$(scripts/pg-server start "$work/pg" --fsync)"
  pg_url=$IDEM_TEST_POSTGRES_URL
  pg_port=$(cat "$work/pg/port")
  psql_() { psql -q -X -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres "$@"; }
  # Connecting migrates the store's table; the raw table copies its shape.
  "$pg_claims" "$pg_url" --seconds 0.1 --warmup 0 >/dev/null
  psql_ -c 'CREATE TABLE raw_claims (LIKE idem_records INCLUDING ALL)'
  # The store's single-claim statement, for pgbench.
  pgbench_claim 1000000000000000 <crates/idem-postgres/queries/claim_one.sql >"$work/claim_one.sql"
  fresh_pg() { psql_ -c 'TRUNCATE idem_records, raw_claims' -c 'CHECKPOINT'; }
  pgbench_() {
    local c=$1 script=$2
    pgbench -h 127.0.0.1 -p "$pg_port" -U postgres -n -M prepared -c "$c" -j $((c < 2 ? c : 2)) \
      -T "$seconds" -f "$script" postgres 2>/dev/null | awk '/^tps/ { print $3 }'
  }
  for c in $concurrency; do
    store="" wide="" raw="" claim=""
    for r in $(seq 1 "$rounds"); do
      fresh_pg
      rate=$(pgbench_ "$c" bench/stores/insert_on_conflict.sql)
      raw="$raw $rate"
      log "postgres c=$c round $r: pgbench $rate/s"
      fresh_pg
      rate=$(pgbench_ "$c" "$work/claim_one.sql")
      claim="$claim $rate"
      log "postgres c=$c round $r: pgbench running claim_one.sql $rate/s"
      fresh_pg
      rate=$("$pg_claims" "$pg_url" --concurrency "$c" --seconds "$seconds" --warmup 1 | store_rate)
      store="$store $rate"
      log "postgres c=$c round $r: store (pool 16) $rate/s"
      if [ "$c" -gt 16 ]; then
        fresh_pg
        rate=$("$pg_claims" "$pg_url" --concurrency "$c" --seconds "$seconds" --warmup 1 \
          --pool-size "$c" | store_rate)
        wide="$wide $rate"
        log "postgres c=$c round $r: store (pool $c) $rate/s"
      fi
    done
    row "PostgreSQL, pool 16" "$c" "$store" "$raw" "$claim"
    [ -z "$wide" ] || row "PostgreSQL, pool $c" "$c" "$wide" "$raw" "$claim"
  done
  scripts/pg-server stop "$work/pg"
fi

if [[ " $engines " == *" redis "* || " $engines " == *" cluster "* ]]; then
  eval "$(IDEM_REDIS_APPENDFSYNC=$appendfsync scripts/redis-servers start "$work/redis")"
  redis_port=$(cat "$work/redis/standalone/port")
  cluster_ports=$(cat "$work"/redis/cluster-*/port)
  flush() {
    for port in "$@"; do redis-cli -h 127.0.0.1 -p "$port" FLUSHALL >/dev/null; done
  }
  # redis-benchmark runs a number of requests, not a time: size it from a short run so it
  # lasts about as long as the store's measurement.
  # bench_rate N C TARGET-OPTIONS... -- COMMAND...
  bench_rate() {
    local n=$1 c=$2; shift 2
    local options=()
    while [ "$1" != -- ]; do options+=("$1"); shift; done
    shift
    redis-benchmark -h 127.0.0.1 "${options[@]}" -c "$c" -n "$n" -r 100000000 -P 1 --csv "$@" \
      2>/dev/null | awk -F'"' '/^"/ && !/^"test"/ { print $4 }'
  }
  redis_raw() {
    local c=$1; shift
    local probe n
    probe=$(bench_rate $((c * 200 > 5000 ? c * 200 : 5000)) "$c" "$@")
    [ -n "$probe" ] || { log "redis-benchmark reported no rate for: $*"; exit 1; }
    n=$(awk -v r="$probe" -v s="$seconds" 'BEGIN { printf "%d", r * s }')
    bench_rate "$n" "$c" "$@"
  }
  # claim.lua as the store sends it: record.lua after its first line.
  claim_lua=$work/claim.lua
  scripts=crates/idem-redis/scripts
  { head -n 1 "$scripts/claim.lua"; cat "$scripts/record.lua"; echo; tail -n +2 "$scripts/claim.lua"; } >"$claim_lua"
  load_script() {
    for port in "$@"; do
      redis-cli -h 127.0.0.1 -p "$port" -x SCRIPT LOAD <"$claim_lua" >/dev/null
    done
  }
  load_script "$redis_port"
  sha=$(redis-cli -h 127.0.0.1 -p "$redis_port" -x SCRIPT LOAD <"$claim_lua")
  # The claim script's arguments: fingerprint (hex), lease, retention (ms), holder (hex).
  claim_args=("$(printf 'ab%.0s' $(seq 32))" 60000 60000 "$(printf 'cd%.0s' $(seq 16))")
  for engine in redis cluster; do
    [[ " $engines " == *" $engine "* ]] || continue
    if [ "$engine" = redis ]; then
      label=Redis
      url=$IDEM_TEST_REDIS_URL ports=$redis_port
      raw_args=(-p "$redis_port" -- SET 'key:__rand_int__' val NX PX 60000)
      script_args=(-p "$redis_port" -- EVALSHA "$sha" 1 'idem-raw:{__rand_int__}' "${claim_args[@]}")
    else
      label="Redis Cluster (3 masters)"
      url=$IDEM_TEST_REDIS_CLUSTER_URL ports=$cluster_ports
      raw_args=(--cluster -p "$(echo "$cluster_ports" | head -n 1)" -- SET 'key:{tag}:__rand_int__' val NX PX 60000)
      script_args=(--cluster -p "$(echo "$cluster_ports" | head -n 1)" -- EVALSHA "$sha" 1 'idem-raw:{tag}:__rand_int__' "${claim_args[@]}")
    fi
    for c in $concurrency; do
      store="" raw="" claim=""
      for r in $(seq 1 "$rounds"); do
        flush $ports
        rate=$(redis_raw "$c" "${raw_args[@]}")
        raw="$raw $rate"
        log "$engine c=$c round $r: redis-benchmark $rate/s"
        flush $ports
        load_script $ports
        rate=$(redis_raw "$c" "${script_args[@]}")
        claim="$claim $rate"
        log "$engine c=$c round $r: redis-benchmark running claim.lua $rate/s"
        flush $ports
        rate=$("$redis_claims" "$url" --concurrency "$c" --seconds "$seconds" --warmup 1 | store_rate)
        store="$store $rate"
        log "$engine c=$c round $r: store $rate/s"
      done
      row "$label" "$c" "$store" "$raw" "$claim"
    done
  done
  scripts/redis-servers stop "$work/redis" >/dev/null 2>&1
fi

echo "Run of $(date -u +%Y-%m-%d), $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -n 1)),"
if [[ " $engines " == *" postgres "* ]]; then
  echo "$(psql --version | head -n 1 | sed 's/^psql (PostgreSQL)/PostgreSQL/') with fsync on;"
fi
if [[ " $engines " == *" redis "* || " $engines " == *" cluster "* ]]; then
  persistence="no persistence"
  [ -z "$appendfsync" ] || persistence="appendonly yes, appendfsync $appendfsync"
  echo "Redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/') with $persistence;"
fi
echo "$rounds rounds of ${seconds}s measurements; rates are medians, ratios the median (and range) of the rounds' ratios."
echo
echo "| engine | concurrency | idem store claims/s | raw engine, equivalent write /s | store ÷ raw | raw engine running idem's claim /s | store ÷ that (client) | that ÷ raw (server) |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
