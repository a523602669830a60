#!/usr/bin/env bash
# Tests the routing of config/alertmanager.yml with `amtool config routes
# test` (run by `make check-alerting`, so by make test): each case is the
# labels of an alert as config/prometheus-rules.yaml makes it and the
# receiver it must reach. Fails on the first case that reaches another.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-config/alertmanager.yml}

rc=0
route() {
  local want=$1; shift
  local got
  got=$(amtool config routes test --config.file="$config" "$@" 2>/dev/null || true)
  if [ "$got" = "$want" ]; then
    echo "ok   $want <- $*"
  else
    echo "FAIL $* went to '$got', want '$want'" >&2
    rc=1
  fi
}

# An invariant owned by team-a: its critical anomaly pages team A.
route team-a-pager alertname=PgConsistencyNewAnomalies owner=team-a severity=critical \
  invariant=dataset_seed_missing postgresql_database_name=app
# An invariant owned by team-b: its warning goes to team B's chat.
route team-b-chat alertname=PgConsistencyNewAnomalies owner=team-b severity=warning \
  invariant=dataset_statistics_missing postgresql_database_name=app
# and not the other way round
route team-a-chat alertname=PgConsistencyRefreshFailing owner=team-a severity=warning invariant=x
route team-b-pager alertname=PgConsistencyNewAnomalies owner=team-b severity=critical invariant=x
route tickets alertname=PgConsistencyAnomaliesPersist owner=team-a severity=info invariant=x
# The dataset pack's default owner.
route data-platform-pager alertname=PgConsistencyNewAnomalies owner=data-platform severity=critical \
  invariant=dataset_key_blocks_missing
route data-platform-chat alertname=PgConsistencySnapshotStale owner=data-platform severity=warning \
  invariant=dataset_key_blocks_missing
# No owner, or one without a route: by severity.
route pager alertname=PgConsistencyDatabaseDown owner=unowned severity=critical postgresql_database_name=app
route chat alertname=PgConsistencyNewAnomalies owner=team-z severity=warning invariant=x
route tickets alertname=PgConsistencyAnomaliesPersist owner=unowned severity=info invariant=x
exit $rc
