//go:build e2e

package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

// freshnessCollectorConfig: the receiver's scheduler every minute (the
// shortest pg_cron schedule too) and a 10 s collection interval.
const freshnessCollectorConfig = `
receivers:
  pgconsistency:
    endpoint: ${env:PGCONSISTENCY_DB_ENDPOINT}
    username: ${env:PGCONSISTENCY_DB_USER}
    password: ${env:PGCONSISTENCY_DB_PASSWORD}
    database: ${env:PGCONSISTENCY_DB_NAME}
    collection_interval: 10s
    tls:
      insecure: true
    refresh:
      poll_interval: 1m
exporters:
  prometheus:
    endpoint: ${env:PGCONSISTENCY_PROMETHEUS_ENDPOINT}
service:
  pipelines:
    metrics:
      receivers: [pgconsistency]
      exporters: [prometheus]
  telemetry:
    metrics:
      level: none
`

// TestIncrementalFreshness: the thirteen dataset invariants of today's
// schema in incremental mode with a refresh_period of one minute, refreshed
// by the built collector's scheduler every minute. A dataset that loses its
// Seed shows in pgconsistency_anomalies within two minutes (the issue's
// bound: one schedule tick, one incremental refresh, one scrape), found by
// an incremental refresh, not a reconcile.
func TestIncrementalFreshness(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewCurrentDatabase(t, srv, fixture.CurrentInvariants...)
	admin := srv.Conn(t, db)
	_, err := admin.Exec(t.Context(), `SELECT pgconsistency.set_refresh_mode(name, 'incremental') FROM pgconsistency.invariant`)
	require.NoError(t, err)
	_, err = admin.Exec(t.Context(), `UPDATE pgconsistency.invariant SET refresh_period = '1 minute'`)
	require.NoError(t, err)
	_, err = admin.Exec(t.Context(), "CALL pgconsistency.refresh(force => true)") // the reconcile
	require.NoError(t, err)

	exporter := "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t))
	config := filepath.Join(t.TempDir(), "collector.yaml")
	require.NoError(t, os.WriteFile(config, []byte(freshnessCollectorConfig), 0o644))
	startCollector(t, config, map[string]string{
		"PGCONSISTENCY_DB_ENDPOINT":         "127.0.0.1:" + strconv.Itoa(srv.Port),
		"PGCONSISTENCY_DB_USER":             srv.User,
		"PGCONSISTENCY_DB_PASSWORD":         srv.Password,
		"PGCONSISTENCY_DB_NAME":             db,
		"PGCONSISTENCY_PROMETHEUS_ENDPOINT": exporter,
	})
	want := fixture.CurrentExpected(fixture.CurrentInvariants...)
	var before float64
	var last map[string]map[string]float64
	var lastErr error
	if !assert.Eventually(t, func() bool {
		got, _, err := exporterValues(exporter)
		last, lastErr = got, err
		if err != nil || got["pgconsistency_up"][""] != 1 {
			return false
		}
		before = got["pgconsistency_anomalies"]["dataset_seed_missing"]
		return before == float64(len(want["dataset_seed_missing"]))
	}, time.Minute, time.Second) {
		t.Fatalf("the collector never reported the fixture's dataset_seed_missing count (%d); last scrape: %v %v",
			len(want["dataset_seed_missing"]), lastErr, last)
	}

	// A clean dataset (1 is clean in every fixture) loses its Seed.
	broken := time.Now()
	_, err = admin.Exec(t.Context(), "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", fixture.DatasetID(1))
	require.NoError(t, err)
	var seen time.Duration
	require.Eventually(t, func() bool {
		got, _, err := exporterValues(exporter)
		if err == nil && got["pgconsistency_anomalies"]["dataset_seed_missing"] == before+1 {
			seen = time.Since(broken)
			return true
		}
		return false
	}, 2*time.Minute, time.Second, "a broken dataset was not in the metric within 2 minutes")
	var kind string
	var rechecked int64
	require.NoError(t, admin.QueryRow(t.Context(), `SELECT last_refresh_kind, rechecked_keys FROM pgconsistency.status
		WHERE invariant = 'dataset_seed_missing'`).Scan(&kind, &rechecked))
	require.Equal(t, "incremental", kind, "found by an incremental refresh")
	require.EqualValues(t, 1, rechecked, "the refresh re-checked the one dataset written")
	t.Logf("a dataset that lost its Seed was in pgconsistency_anomalies %.1f s later (scheduler every 1m, scrape every 10s)", seen.Seconds())
}
