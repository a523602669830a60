#!/usr/bin/env bash
# make run: the whole path on a throwaway PostgreSQL with demo data.
#   1. a PostgreSQL cluster (with pg_cron) in a temporary directory, on a free port
#   2. the application schema, 30 datasets and a few broken ones of every kind
#   3. sql/install.sql, one refresh, every invariant in incremental mode with
#      the WAL capture (logical decoding: nothing in the writers' transactions),
#      a least-privilege role for the collector, and sql/pg_cron.sql so that
#      due invariants refresh every minute
#   4. the collector (config/collector-prometheus.yaml), whose changes loop
#      refreshes what writes changed within seconds, and Prometheus if installed
# Ctrl-C stops everything and removes the temporary directory.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
collector="$root/_build/otelcol-pgconsistency"
[ -x "$collector" ] || { echo "demo: $collector is missing: run make build" >&2; exit 1; }

pgbin=$(pg_config --bindir 2>/dev/null || true)
[ -x "${pgbin:-}/initdb" ] || pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "${pgbin:-}/initdb" ] || { echo "demo: PostgreSQL server binaries not found: run scripts/install-deps.sh" >&2; exit 1; }

# free_port PREFERRED: the first port from PREFERRED on that nothing listens on.
free_port() {
  local p=$1
  while (echo >"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
  echo "$p"
}

# PostgreSQL refuses to run as root: run its programs as postgres then.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

work=$(mktemp -d /tmp/pgconsistency-demo.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  trap - EXIT INT TERM
  echo
  echo "demo: stopping"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  as_pg "$pgbin/pg_ctl" -D "$work/pg" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$work"
  echo "demo: stopped, $work removed"
}
trap cleanup EXIT
trap 'exit 0' INT TERM  # Ctrl-C is how the demo is meant to end

pg_port=$(free_port 55432)
[ "$(id -u)" -eq 0 ] && chown postgres "$work"
password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')

echo "demo: starting PostgreSQL on 127.0.0.1:$pg_port (data in $work/pg)"
as_pg "$pgbin/initdb" -D "$work/pg" -U postgres -A trust --no-sync >/dev/null
preload=""
[ -e "$("$pgbin/pg_config" --pkglibdir 2>/dev/null || echo /usr/lib/postgresql/15/lib)/pg_cron.so" ] &&
  preload="-c shared_preload_libraries=pg_cron -c cron.database_name=demo -c cron.host=$work"
as_pg "$pgbin/pg_ctl" -D "$work/pg" -l "$work/postgres.log" -w -o \
  "-p $pg_port -c listen_addresses=127.0.0.1 -k $work -c fsync=off -c wal_level=logical -c max_slot_wal_keep_size=1GB $preload" start >/dev/null

psql_demo() { psql -X -q -v ON_ERROR_STOP=1 -h "$work" -p "$pg_port" -U postgres "$@"; }
psql_demo -d postgres -c "CREATE DATABASE demo"
echo "demo: loading the service's schema of today and demo data (30 datasets, 27 broken)"
psql_demo -d demo -f "$root/testdata/schema.sql"
psql_demo -d demo -f "$root/testdata/fixtures/clean.sql"
for f in "$root"/testdata/fixtures/*.sql; do
  case "$(basename "$f")" in clean.sql|incident.sql) ;; *) psql_demo -d demo -f "$f" ;; esac
done
echo "demo: installing sql/install.sql and refreshing every invariant once"
psql_demo -d demo -f "$root/sql/install.sql" >/dev/null
psql_demo -d demo -c "CALL pgconsistency.refresh()"
# Incremental refresh, its keys read from the WAL (docs/sql.md, "Which
# capture to choose"): the replica identities wal_capture_tables() asks for
# (the demo's broken tables lost their unique indexes: FULL there), then
# set_capture('wal') in a transaction of its own.
echo "demo: every invariant in incremental mode, with the WAL capture"
psql_demo -d demo -c "SELECT pgconsistency.set_refresh_mode(name, 'incremental') FROM pgconsistency.invariant" >/dev/null
psql_demo -d demo -At -c "SELECT fix FROM pgconsistency.wal_capture_tables() WHERE fix IS NOT NULL" | psql_demo -d demo >/dev/null
psql_demo -d demo -c "SELECT pgconsistency.set_capture('wal')" >/dev/null
psql_demo -d demo -c "CALL pgconsistency.refresh(force => true)"
if [ -n "$preload" ]; then
  echo "demo: scheduling refreshes with pg_cron (sql/pg_cron.sql: every minute, due invariants only)"
  psql_demo -d demo -v database=demo -f "$root/sql/pg_cron.sql" >/dev/null
fi
# Least privilege as shipped: the collector logs in as a member of
# pgconsistency_reader (sql/roles.sql), which reads the status view only,
# and of pgconsistency_refresher, which runs the refreshes (the receiver's
# changes loop refreshes what writes changed within seconds).
psql_demo -d demo -f "$root/sql/roles.sql" >/dev/null
psql_demo -d demo <<SQL
CREATE ROLE otel_pgconsistency LOGIN PASSWORD '$password';
GRANT pgconsistency_reader, pgconsistency_refresher TO otel_pgconsistency;
SQL
psql_demo -d demo -c "SELECT invariant, severity, anomalies, new_anomalies, last_run_outcome FROM pgconsistency.status ORDER BY invariant"

exporter_port=$(free_port 9464)
health_port=$(free_port 13133)
telemetry_port=$(free_port 8888)
echo "demo: starting the collector (log: $work/collector.log)"
PGCONSISTENCY_DB_ENDPOINT="127.0.0.1:$pg_port" \
PGCONSISTENCY_DB_USER=otel_pgconsistency \
PGCONSISTENCY_DB_PASSWORD="$password" \
PGCONSISTENCY_DB_NAME=demo \
PGCONSISTENCY_DB_TLS_INSECURE=true \
PGCONSISTENCY_COLLECTION_INTERVAL=2s \
PGCONSISTENCY_PROMETHEUS_ENDPOINT="127.0.0.1:$exporter_port" \
PGCONSISTENCY_HEALTH_ENDPOINT="127.0.0.1:$health_port" \
PGCONSISTENCY_TELEMETRY_PORT="$telemetry_port" \
  "$collector" --config "$root/config/collector-prometheus.yaml" >"$work/collector.log" 2>&1 &
pids+=($!)

prom_line="Prometheus is not installed (apt-get install prometheus) — skipped"
if command -v prometheus >/dev/null 2>&1; then
  prom_port=$(free_port 9090)
  mkdir -p "$work/prometheus"
  sed -e "s/COLLECTOR_TARGET/127.0.0.1:$exporter_port/" -e "s|RULES_FILE|$root/config/prometheus-rules.yaml|" \
    "$root/config/prometheus.yml" >"$work/prometheus/prometheus.yml"
  prometheus --config.file="$work/prometheus/prometheus.yml" --storage.tsdb.path="$work/prometheus/data" \
    --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
  pids+=($!)
  prom_line="Prometheus UI:  http://127.0.0.1:$prom_port/graph?g0.expr=pgconsistency_anomalies&g0.tab=1
                  alerts: http://127.0.0.1:$prom_port/alerts (the rules of config/prometheus-rules.yaml)"
fi

# Wait for the first scrape to reach the exporter.
for _ in $(seq 1 60); do
  if curl -sf "http://127.0.0.1:$exporter_port/metrics" 2>/dev/null | grep -q '^pgconsistency_up'; then break; fi
  sleep 1
done
echo
echo "demo: metrics now (curl -s http://127.0.0.1:$exporter_port/metrics | grep '^pgconsistency_'):"
curl -sf "http://127.0.0.1:$exporter_port/metrics" | grep -E '^pgconsistency_(anomalies|up)\b' | sed 's/^/  /' ||
  { echo "demo: the collector did not export metrics; its log:"; tail -20 "$work/collector.log"; exit 1; }
cat <<EOF

  metrics:        curl -s http://127.0.0.1:$exporter_port/metrics | grep '^pgconsistency_'
  $prom_line
  database:       psql -h $work -p $pg_port -U postgres -d demo
                  e.g. break one more dataset and watch the gauge move within seconds
                  (no refresh to run: the WAL capture and the collector's changes loop):
                  DELETE FROM dataset_key_blocks WHERE dataset_id = fixture.dataset_id(1) AND event_type = 'Seed';
                  then: curl -s http://127.0.0.1:$exporter_port/metrics | grep 'pgconsistency_anomalies{.*dataset_seed_missing'
                  (dataset_seed_missing goes from 3 to 4)
  collector log:  $work/collector.log

Press Ctrl-C to stop everything and remove $work.
EOF
wait "${pids[0]}"
echo "demo: the collector exited; its log:"
tail -20 "$work/collector.log"
exit 1
