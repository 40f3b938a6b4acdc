# Sourced by bench/stores/run.sh and bench/stores/pg_statements.sh.
#
# pgbench_claim MAX_ID <claim_one.sql >script: the store's single-claim statement as a
# pgbench script against the table idem_records: comment lines dropped, an id from a random
# number in 1..MAX_ID (the same in every place the statement names it), a fixed fingerprint
# and holder, a lease and a retention of 60 s.
pgbench_claim() {
  grep -v '^--' \
    | sed -e 's/{{table}}/idem_records/g' \
      -e 's/\$1::bytea/sha256(:id::text::bytea)/g' \
      -e "s/\\\$2::bytea/'\\\\x$(printf 'ab%.0s' $(seq 32))'::bytea/" \
      -e 's/\$3::bigint/60000::bigint/g; s/\$4::bigint/60000::bigint/g' \
      -e "s/\\\$5::bytea/'\\\\x$(printf 'cd%.0s' $(seq 16))'::bytea/" \
    | { echo "\\set id random(1, $1)"; tr '\n' ' '; echo ';'; }
}
