//go:build e2e

package e2e

import (
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/pdata/plog/plogotlp"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

// logSink is an OTLP/HTTP logs endpoint: it counts the records of new
// anomalies it receives, by invariant and key, and keeps the records of
// finished refresh requests (SQL 0.6.0) apart.
type logSink struct {
	mu       sync.Mutex
	records  map[string]int            // "invariant/key" → how many times received
	attrs    map[string]map[string]any // "invariant/key" → the latest record's attributes
	finished []finishedLog             // event pgconsistency.refresh.finished, in the order received
}

// finishedLog is a record of a finished refresh request.
type finishedLog struct {
	body  string
	attrs map[string]any
}

func startLogSink(t *testing.T) (*logSink, string) {
	t.Helper()
	s := &logSink{records: map[string]int{}, attrs: map[string]map[string]any{}}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var in io.Reader = r.Body
		if r.Header.Get("Content-Encoding") == "gzip" { // the otlphttp exporter's default
			zr, err := gzip.NewReader(r.Body)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			in = zr
		}
		body, err := io.ReadAll(in)
		req := plogotlp.NewExportRequest()
		if err == nil {
			err = req.UnmarshalProto(body)
		}
		if err != nil || r.URL.Path != "/v1/logs" {
			t.Logf("log sink: refused %s %s: %v", r.Method, r.URL.Path, err)
			http.Error(w, fmt.Sprintf("%s: %v", r.URL.Path, err), http.StatusBadRequest)
			return
		}
		s.mu.Lock()
		rls := req.Logs().ResourceLogs()
		for i := 0; i < rls.Len(); i++ {
			sls := rls.At(i).ScopeLogs()
			for j := 0; j < sls.Len(); j++ {
				lrs := sls.At(j).LogRecords()
				for k := 0; k < lrs.Len(); k++ {
					attrs := lrs.At(k).Attributes()
					if lrs.At(k).EventName() == "pgconsistency.refresh.finished" {
						s.finished = append(s.finished, finishedLog{body: lrs.At(k).Body().Str(), attrs: attrs.AsRaw()})
						continue
					}
					inv, _ := attrs.Get("pgconsistency.invariant")
					key, _ := attrs.Get("pgconsistency.anomaly.key")
					s.records[inv.Str()+"/"+key.Str()]++
					s.attrs[inv.Str()+"/"+key.Str()] = attrs.AsRaw()
				}
			}
		}
		s.mu.Unlock()
		out, _ := plogotlp.NewExportResponse().MarshalProto()
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(out)
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return s, "http://" + ln.Addr().String()
}

// attributes returns the attributes of the latest record of invariant and
// key, and whether one was received.
func (s *logSink) attributes(invariant, key string) (map[string]any, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	a, ok := s.attrs[invariant+"/"+key]
	return a, ok
}

// finishedRecords returns the records of finished refresh requests received.
func (s *logSink) finishedRecords() []finishedLog {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.finished)
}

func (s *logSink) snapshot() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.records)
}

// pgbouncerCollectorConfig is the collector of this test: metrics to the
// Prometheus exporter, new anomalies as logs over OTLP/HTTP, and the
// receiver's refresh scheduler, all through PgBouncer.
const pgbouncerCollectorConfig = `
receivers:
  pgconsistency:
    endpoint: ${env:PGCONSISTENCY_DB_ENDPOINT}
    username: ${env:PGCONSISTENCY_DB_USER}
    password: ${env:PGCONSISTENCY_DB_PASSWORD}
    database: ${env:PGCONSISTENCY_DB_NAME}
    collection_interval: 1s
    tls:
      insecure: true
    refresh:
      poll_interval: 1s
exporters:
  prometheus:
    endpoint: ${env:PGCONSISTENCY_PROMETHEUS_ENDPOINT}
    resource_to_telemetry_conversion:
      enabled: true
  otlphttp/logs:
    endpoint: ${env:PGCONSISTENCY_LOGS_OTLP_ENDPOINT}
    sending_queue: {enabled: false} # as config/collector-logs.yaml: nothing acknowledged before delivery
    retry_on_failure:
      enabled: false
service:
  pipelines:
    metrics:
      receivers: [pgconsistency]
      exporters: [prometheus]
    logs:
      receivers: [pgconsistency]
      exporters: [otlphttp/logs]
  telemetry:
    metrics:
      level: none
`

// exporterValues returns every pgconsistency_* sample of the exporter's page
// by metric name and invariant ("" for database-wide metrics).
func exporterValues(endpoint string) (map[string]map[string]float64, map[string]string, error) {
	samples, err := testkit.Scrape("http://" + endpoint + "/metrics")
	if err != nil {
		return nil, nil, err
	}
	out := map[string]map[string]float64{}
	var versionLabels map[string]string
	for _, s := range samples {
		if !strings.HasPrefix(s.Name, "pgconsistency_") || len(s.Labels) == 0 {
			continue
		}
		if out[s.Name] == nil {
			out[s.Name] = map[string]float64{}
		}
		out[s.Name][s.Labels["invariant"]] = s.Value
		if s.Name == "pgconsistency_version" {
			versionLabels = s.Labels
		}
	}
	return out, versionLabels, nil
}

// exact says what differs between a scrape of the exporter and the counts
// the database must report; "" when the scrape is exact.
func exact(got map[string]map[string]float64, want map[string]float64) string {
	if up := got["pgconsistency_up"][""]; up != 1 {
		return fmt.Sprintf("pgconsistency_up = %v", up)
	}
	if !maps.Equal(got["pgconsistency_anomalies"], want) {
		return fmt.Sprintf("pgconsistency_anomalies = %v, want %v", got["pgconsistency_anomalies"], want)
	}
	return ""
}

// TestThroughPgBouncer: the built collector reads metrics, delivers logs and
// runs its refresh scheduler through Debian's PgBouncer in transaction
// pooling mode with its default settings (no ignore_startup_parameters),
// with a pool of 2 server connections that another client keeps busy.
func TestThroughPgBouncer(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv, fixture.Invariants...)
	admin := srv.Conn(t, db)
	_, err := admin.Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)
	srv.PsqlFile(t, db, fixture.Path("sql/roles.sql"))
	role, password := srv.CreateLoginRole(t, db, "otel_bouncer_")
	_, err = admin.Exec(t.Context(), "GRANT pgconsistency_reader, pgconsistency_refresher TO "+pgx.Identifier{role}.Sanitize())
	require.NoError(t, err)

	bouncer := srv.StartPgBouncer(t, db, pgtest.WithPoolSize(2))
	bouncer.AddUser(t, role, password)

	// Another client keeps the two server connections busy with short
	// transactions, so the collector's transactions wait for a server
	// connection and land on whichever is free.
	busyCtx, stopBusy := context.WithCancel(context.Background())
	var busy sync.WaitGroup
	var busyTransactions, busyErrors int64
	var busyMu sync.Mutex
	for range 2 {
		conn, err := pgx.Connect(t.Context(), bouncer.DSN(srv.User, srv.Password))
		require.NoError(t, err)
		busy.Add(1)
		go func() {
			defer busy.Done()
			defer conn.Close(context.Background())
			for busyCtx.Err() == nil {
				err := pgx.BeginFunc(busyCtx, conn, func(tx pgx.Tx) error {
					_, err := tx.Exec(busyCtx, "SELECT pg_sleep(0.03)")
					return err
				})
				busyMu.Lock()
				if err == nil {
					busyTransactions++
				} else if busyCtx.Err() == nil {
					busyErrors++
				}
				busyMu.Unlock()
			}
		}()
	}
	t.Cleanup(func() { stopBusy(); busy.Wait() })

	logs, logsEndpoint := startLogSink(t)
	exporter := "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t))
	config := filepath.Join(t.TempDir(), "collector.yaml")
	require.NoError(t, os.WriteFile(config, []byte(pgbouncerCollectorConfig), 0o644))
	collector := startCollector(t, config, map[string]string{
		"PGCONSISTENCY_DB_ENDPOINT":         "127.0.0.1:" + strconv.Itoa(bouncer.Port),
		"PGCONSISTENCY_DB_USER":             role,
		"PGCONSISTENCY_DB_PASSWORD":         password,
		"PGCONSISTENCY_DB_NAME":             db,
		"PGCONSISTENCY_PROMETHEUS_ENDPOINT": exporter,
		"PGCONSISTENCY_LOGS_OTLP_ENDPOINT":  logsEndpoint,
	})

	want := fixture.Counts[float64]()
	broken := []int{17, 18, 19} // lose their Seed in the second part
	wantAfterBreak := maps.Clone(want)
	wantAfterBreak["dataset_seed_missing"] += float64(len(broken))
	var last map[string]map[string]float64
	require.Eventually(t, func() bool {
		got, _, err := exporterValues(exporter)
		last = got
		return err == nil && exact(got, want) == ""
	}, 60*time.Second, 250*time.Millisecond, "the collector never reported the fixture's counts through PgBouncer: %v", last)

	t.Run("metrics exact on every scrape", func(t *testing.T) {
		var version string
		require.NoError(t, admin.QueryRow(t.Context(), "SELECT pgconsistency.version()").Scan(&version))
		const scrapes = 20
		for i := range scrapes {
			got, labels, err := exporterValues(exporter)
			require.NoError(t, err)
			require.Empty(t, exact(got, want), "scrape %d of %d", i+1, scrapes)
			require.Equal(t, version, labels["version"], "pgconsistency_version")
			time.Sleep(time.Second)
		}
		busyMu.Lock()
		t.Logf("%d exact scrapes, 1 s apart, while the other client ran %d transactions (%d failed) on the 2 server connections",
			scrapes, busyTransactions, busyErrors)
		busyMu.Unlock()
	})

	t.Run("the scheduler refreshes and each new anomaly is logged once", func(t *testing.T) {
		// The logs receiver has made its cursor (it starts at the end).
		require.Eventually(t, func() bool {
			var n int
			err := admin.QueryRow(t.Context(), "SELECT count(*) FROM pgconsistency.log_cursor").Scan(&n)
			return err == nil && n == 1
		}, 30*time.Second, 100*time.Millisecond)
		var before time.Time
		require.NoError(t, admin.QueryRow(t.Context(),
			"SELECT refreshed_at FROM pgconsistency.status WHERE invariant = 'dataset_seed_missing'").Scan(&before))
		for _, i := range broken {
			_, err := admin.Exec(t.Context(), "DELETE FROM public.dataset_key_blocks WHERE dataset_id = $1 AND event_type = 'Seed'", fixture.DatasetID(i))
			require.NoError(t, err)
		}
		// A deploy pipeline's request: the scheduler runs it at its next pass.
		_, err := admin.Exec(t.Context(), "SELECT pgconsistency.request_refresh(delay => '0', reason => 'pgbouncer test')")
		require.NoError(t, err)

		require.Eventually(t, func() bool {
			got, _, err := exporterValues(exporter)
			last = got
			return err == nil && exact(got, wantAfterBreak) == ""
		}, 60*time.Second, 250*time.Millisecond, "the scheduler's refresh did not show: %v", last)
		var after time.Time
		var outcome string
		require.NoError(t, admin.QueryRow(t.Context(),
			"SELECT refreshed_at, last_outcome FROM pgconsistency.status WHERE invariant = 'dataset_seed_missing'").Scan(&after, &outcome))
		assert.True(t, after.After(before), "refreshed at %s, before %s", after, before)
		assert.Equal(t, "succeeded", outcome)

		wantLogs := map[string]int{}
		for _, i := range broken {
			wantLogs["dataset_seed_missing/"+fixture.DatasetID(i)] = 1
		}
		require.Eventually(t, func() bool { return maps.Equal(wantLogs, logs.snapshot()) },
			30*time.Second, 100*time.Millisecond, "log records: %v", logs.snapshot())
		time.Sleep(3 * time.Second) // a few more passes: nothing is delivered twice
		assert.Equal(t, wantLogs, logs.snapshot(), "each new anomaly exactly once")
	})

	t.Run("PgBouncer stopped and back", func(t *testing.T) {
		bouncer.Stop(t)
		require.Eventually(t, func() bool {
			got, _, err := exporterValues(exporter)
			return err == nil && got["pgconsistency_up"][""] == 0
		}, 30*time.Second, 250*time.Millisecond, "pgconsistency_up did not drop to 0")
		require.Eventually(t, func() bool {
			out, _ := os.ReadFile(collector.log)
			// The collector's log escapes the quotes around the database name.
			return strings.Contains(string(out), `cannot read pgconsistency status from database \"`+db+`\" at 127.0.0.1:`+strconv.Itoa(bouncer.Port)+
				" (is the server up and reachable, and are endpoint, username, password and tls right?)")
		}, 10*time.Second, 250*time.Millisecond, "the collector's log names the database, the endpoint and what to check")

		bouncer.StartAgain(t)
		require.Eventually(t, func() bool {
			got, _, err := exporterValues(exporter)
			last = got
			return err == nil && exact(got, wantAfterBreak) == ""
		}, 60*time.Second, 250*time.Millisecond, "not back after PgBouncer restarted: %v", last)
	})
}
