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
			// its new anomaly: after deployment v1.4.2, caused by a DELETE of the migrator
			NewDeployMarker: "v1.4.2", NewDeployedAt: &deployed, NewCauseChangedAt: &changed,
			NewCauseOperation: "DELETE", NewCauseTable: "public.dataset_key_blocks", NewCauseDBUser: "app",
			NewCauseApplicationName: "migrator"},
		// clean: zeros must be emitted, not left out; no new anomalies, so
		// no deploy nor cause series, whatever the row says
		{Invariant: "dataset_head_ref_missing", Severity: "critical",
			RefreshedAt: &refreshed, LastDurationSeconds: ptr(0.25), LastOutcome: "skipped",
			NewDeployMarker: "v1.4.2", NewDeployedAt: &deployed, NewCauseChangedAt: &changed},
		// new anomalies, no deployment since the last clean refresh, no cause recorded
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
		f.rows[i].Version = "0.7.0"
		if f.rows[i].RefreshMode == "" {
			f.rows[i].RefreshMode = "full"
		}
		// the WAL capture, its slot a little behind
		f.rows[i].CaptureReported = true
		f.rows[i].CaptureSlotStatus = "reserved"
		f.rows[i].CaptureWALRetainedBytes = ptr(int64(3 << 20))
		f.rows[i].CaptureWALLagBytes = ptr(int64(1 << 20))
		f.rows[i].CaptureWALBoundBytes = ptr(int64(10 << 30))
	}
	f.rows[0].Capture = "wal" // the one invariant in incremental mode
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

// scrapeValues scrapes once and returns each gauge's values by their
// attributes ("" when a data point has none; "capture=wal" and the like).
func scrapeValues(t *testing.T, s *pgScraper) map[string]map[string]int64 {
	t.Helper()
	md, err := s.scrape(context.Background())
	require.NoError(t, err)
	out := map[string]map[string]int64{}
	rms := md.ResourceMetrics()
	for i := 0; i < rms.Len(); i++ {
		sms := rms.At(i).ScopeMetrics()
		for j := 0; j < sms.Len(); j++ {
			ms := sms.At(j).Metrics()
			for k := 0; k < ms.Len(); k++ {
				m := ms.At(k)
				if out[m.Name()] == nil {
					out[m.Name()] = map[string]int64{}
				}
				dps := m.Gauge().DataPoints()
				for d := 0; d < dps.Len(); d++ {
					key := ""
					if c, ok := dps.At(d).Attributes().Get("capture"); ok {
						key = "capture=" + c.Str()
					} else if inv, ok := dps.At(d).Attributes().Get("invariant"); ok {
						key = inv.Str()
					}
					out[m.Name()][key] = dps.At(d).IntValue()
				}
			}
		}
	}
	return out
}

// captureRows are status rows of SQL 0.7.0: two invariants in incremental
// mode with capture, one in full mode.
func captureRows(capture string, slot func(*invariantStatus)) []invariantStatus {
	rows := []invariantStatus{
		{Invariant: "dataset_seed_missing", Severity: "critical", LastOutcome: "succeeded", RefreshMode: "incremental", Capture: capture},
		{Invariant: "dataset_chain_gap", Severity: "critical", LastOutcome: "succeeded", RefreshMode: "incremental", Capture: capture},
		{Invariant: "dataset_owner_missing", Severity: "warning", LastOutcome: "succeeded", RefreshMode: "full"},
	}
	for i := range rows {
		rows[i].Version = "0.7.0"
		rows[i].CaptureReported = true
		if slot != nil {
			slot(&rows[i])
		}
	}
	return rows
}

func TestScrapeTriggerCaptureReportsZeroWALInvariants(t *testing.T) {
	got := scrapeValues(t, startFake(t, &fakeClient{rows: captureRows("trigger", nil)}))
	assert.Equal(t, map[string]int64{"capture=trigger": 2, "capture=wal": 0}, got["pgconsistency.capture.invariants"])
	for _, name := range []string{"pgconsistency.capture.wal.retained", "pgconsistency.capture.wal.lag", "pgconsistency.capture.wal.bound"} {
		assert.NotContains(t, got, name, "no slot with the trigger capture")
	}
}

func TestScrapeWALCaptureReportsItsSlot(t *testing.T) {
	got := scrapeValues(t, startFake(t, &fakeClient{rows: captureRows("wal", func(r *invariantStatus) {
		r.CaptureSlotStatus = "extended"
		r.CaptureWALRetainedBytes = ptr(int64(600 << 20))
		r.CaptureWALLagBytes = ptr(int64(500 << 20))
		r.CaptureWALBoundBytes = ptr(int64(1 << 30))
	})}))
	assert.Equal(t, map[string]int64{"capture=trigger": 0, "capture=wal": 2}, got["pgconsistency.capture.invariants"])
	assert.Equal(t, map[string]int64{"": 600 << 20}, got["pgconsistency.capture.wal.retained"])
	assert.Equal(t, map[string]int64{"": 500 << 20}, got["pgconsistency.capture.wal.lag"])
	assert.Equal(t, map[string]int64{"": 1 << 30}, got["pgconsistency.capture.wal.bound"])
}

// An unbounded slot has no bound series; a missing (dropped, or lost in a
// failover) slot keeps nothing: 0, not absent.
func TestScrapeWALCaptureUnboundedAndMissingSlot(t *testing.T) {
	got := scrapeValues(t, startFake(t, &fakeClient{rows: captureRows("wal", func(r *invariantStatus) {
		r.CaptureSlotStatus = "missing"
		r.CaptureWALLagBytes = ptr(int64(4096))
	})}))
	assert.Equal(t, map[string]int64{"": 0}, got["pgconsistency.capture.wal.retained"])
	assert.Equal(t, map[string]int64{"": 4096}, got["pgconsistency.capture.wal.lag"])
	assert.NotContains(t, got, "pgconsistency.capture.wal.bound")
}

// SQL older than 0.7.0 has no capture to report: no capture series at all
// (not a trigger count of 0, which would say "nothing").
func TestScrapeOlderSQLReportsNoCapture(t *testing.T) {
	rows := captureRows("", nil)
	for i := range rows {
		rows[i].Version = "0.6.0"
		rows[i].CaptureReported = false
	}
	got := scrapeValues(t, startFake(t, &fakeClient{rows: rows}))
	require.Contains(t, got, "pgconsistency.anomalies")
	for name := range got {
		assert.NotContains(t, name, "pgconsistency.capture", "SQL 0.6.0")
	}
}
