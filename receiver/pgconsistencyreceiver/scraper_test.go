package pgconsistencyreceiver

import (
	"context"
	"errors"
	"flag"
	"path/filepath"
	"testing"
	"time"

	"github.com/open-telemetry/opentelemetry-collector-contrib/pkg/golden"
	"github.com/open-telemetry/opentelemetry-collector-contrib/pkg/pdatatest/pmetrictest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/receiver/receivertest"
	"go.opentelemetry.io/collector/scraper/scrapererror"

	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// fakeClient returns canned status rows or an error.
type fakeClient struct {
	rows   []invariantStatus
	err    error
	closed bool
}

func (f *fakeClient) status(context.Context) ([]invariantStatus, error) { return f.rows, f.err }
func (f *fakeClient) close()                                            { f.closed = true }

var update = flag.Bool("update", false, "rewrite the golden files in testdata/scraper")

func ptr[T any](v T) *T { return &v }

func testConfig() *Config {
	cfg := createDefaultConfig()
	cfg.Endpoint = "db.example.internal:5433"
	cfg.Username = "otel"
	cfg.Database = "app"
	return cfg
}

func startFake(t *testing.T, f *fakeClient) *pgScraper {
	t.Helper()
	s := newScraper(testConfig(), receivertest.NewNopSettings(metadata.Type),
		func(context.Context, *Config) (client, error) { return f, nil })
	require.NoError(t, s.start(context.Background(), nil))
	t.Cleanup(func() { require.NoError(t, s.shutdown(context.Background())) })
	return s
}

func compareGolden(t *testing.T, file string, s *pgScraper) error {
	t.Helper()
	actual, err := s.scrape(context.Background())
	path := filepath.Join("testdata", "scraper", file)
	if *update {
		require.NoError(t, golden.WriteMetrics(t, path, actual))
	}
	expected, rerr := golden.ReadMetrics(path)
	require.NoError(t, rerr)
	require.NoError(t, pmetrictest.CompareMetrics(expected, actual,
		pmetrictest.IgnoreTimestamp(), pmetrictest.IgnoreStartTimestamp(),
		pmetrictest.IgnoreMetricDataPointsOrder(), pmetrictest.IgnoreResourceMetricsOrder()))
	return err
}

func TestScrapeReportsEveryInvariant(t *testing.T) {
	refreshed := time.Date(2026, 11, 23, 18, 30, 0, 0, time.UTC)
	deployed := time.Date(2026, 11, 23, 18, 0, 0, 0, time.UTC)
	changed := time.Date(2026, 11, 23, 18, 5, 7, 0, time.UTC)
	f := &fakeClient{rows: []invariantStatus{
		// incremental, and its latest reconcile corrected what the capture missed
		{Invariant: "dataset_seed_missing", Severity: "critical", Anomalies: 3, NewAnomalies: 1,
			ResolvedAnomalies: 2, AcknowledgedAnomalies: 5, RefreshedAt: &refreshed, LastDurationSeconds: ptr(1.5), LastOutcome: "succeeded",
			RefreshMode: "incremental", HealedAnomalies: 2, Owner: "team-a", RunbookURL: "https://wiki.example.com/seed",
			// its new anomaly: after deploy v1.4.2, caused by a DELETE of the migrator
			NewDeployMarker: "v1.4.2", NewDeployedAt: &deployed, NewCauseChangedAt: &changed,
			NewCauseOperation: "DELETE", NewCauseTable: "public.dataset_key_blocks", NewCauseDBUser: "app",
			NewCauseApplicationName: "migrator"},
		// clean: zeros must be emitted, not left out; no new anomalies, so
		// no deploy nor cause series, whatever the row says
		{Invariant: "dataset_head_ref_missing", Severity: "critical",
			RefreshedAt: &refreshed, LastDurationSeconds: ptr(0.25), LastOutcome: "skipped",
			NewDeployMarker: "v1.4.2", NewDeployedAt: &deployed, NewCauseChangedAt: &changed},
		// new anomalies, no deploy since the last clean refresh, no cause recorded
		{Invariant: "dataset_chain_gap", Severity: "critical", Anomalies: 1, NewAnomalies: 1,
			RefreshedAt: &refreshed, LastDurationSeconds: ptr(0.5), LastOutcome: "succeeded", NewDeployMarker: "v1.4.2"},
		// never refreshed: snapshot timestamp 0, duration 0
		{Invariant: "derivative_dependencies_missing", Severity: "warning", LastOutcome: "never"},
		// failing: the old snapshot stays, failures count up. An owner
		// without a runbook: only the owner attribute.
		{Invariant: "dataset_statistics_missing", Severity: "warning", Anomalies: 2, Owner: "team-b",
			RefreshedAt: &refreshed, LastDurationSeconds: ptr(30.0), ConsecutiveFailures: 4, LastOutcome: "timed_out"},
	}}
	for i := range f.rows {
		f.rows[i].RefreshPeriod = 1800
		f.rows[i].PendingRequests = 1
		f.rows[i].DeployMarkerChangedAt = &deployed
		f.rows[i].DeployMarker = "v1.4.2"
		f.rows[i].Version = "0.5.0"
		if f.rows[i].RefreshMode == "" {
			f.rows[i].RefreshMode = "full"
		}
	}
	s := startFake(t, f)
	require.NoError(t, compareGolden(t, "expected.yaml", s))
}

func TestScrapeNoInvariantsStillReportsUp(t *testing.T) {
	s := startFake(t, &fakeClient{})
	require.NoError(t, compareGolden(t, "expected_no_invariants.yaml", s))
}

func TestScrapeDatabaseDownReportsUpZero(t *testing.T) {
	f := &fakeClient{err: errors.New("cannot read pgconsistency status: connection refused")}
	s := startFake(t, f)
	err := compareGolden(t, "expected_down.yaml", s)
	require.Error(t, err)
	// partial, so the controller forwards pgconsistency.up = 0 instead of dropping it
	assert.True(t, scrapererror.IsPartialScrapeError(err))
	assert.ErrorContains(t, err, "connection refused")
}

func TestShutdownClosesClientAndIsSafeWithoutStart(t *testing.T) {
	s := newScraper(testConfig(), receivertest.NewNopSettings(metadata.Type),
		func(context.Context, *Config) (client, error) { return nil, errors.New("unused") })
	require.NoError(t, s.shutdown(context.Background()))

	f := &fakeClient{}
	s = newScraper(testConfig(), receivertest.NewNopSettings(metadata.Type),
		func(context.Context, *Config) (client, error) { return f, nil })
	require.NoError(t, s.start(context.Background(), nil))
	require.NoError(t, s.shutdown(context.Background()))
	assert.True(t, f.closed)
}

func TestStartFailsOnBadTLSFiles(t *testing.T) {
	cfg := testConfig()
	cfg.TLS.CAFile = filepath.Join(t.TempDir(), "missing-ca.pem")
	cfg.TLS.InsecureSkipVerify = false
	_, err := newPgxClient(context.Background(), cfg)
	require.ErrorContains(t, err, `loading "tls" settings`)
}
