//go:build e2e

package e2e

import (
	"compress/gzip"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/pdata/plog/plogotlp"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

// backend is an OTLP/HTTP logs endpoint that can be down (503), refuse
// requests (400) or take them (200). It records the anomaly ids
// (pgconsistency.anomaly.seq) of every request by the answer it gave.
type backend struct {
	mu       sync.Mutex
	status   int     // the answer to the next requests
	refuse   int     // the next this many requests get 400, whatever status says
	received []int64 // the seqs of the requests answered 200, in order, repeats included
	refused  [][]int64
	attempts map[int]int // answer → requests
}

func startBackend(t *testing.T) (*backend, string) {
	t.Helper()
	b := &backend{status: http.StatusServiceUnavailable, attempts: map[int]int{}}
	srv := &http.Server{Handler: http.HandlerFunc(b.serve)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return b, "http://" + ln.Addr().String()
}

func (b *backend) serve(w http.ResponseWriter, r *http.Request) {
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
		http.Error(w, fmt.Sprintf("%s: %v", r.URL.Path, err), http.StatusBadRequest)
		return
	}
	var seqs []int64
	rls := req.Logs().ResourceLogs()
	for i := 0; i < rls.Len(); i++ {
		sls := rls.At(i).ScopeLogs()
		for j := 0; j < sls.Len(); j++ {
			lrs := sls.At(j).LogRecords()
			for k := 0; k < lrs.Len(); k++ {
				if v, ok := lrs.At(k).Attributes().Get("pgconsistency.anomaly.seq"); ok {
					seqs = append(seqs, v.Int())
				}
			}
		}
	}
	b.mu.Lock()
	status := b.status
	if b.refuse > 0 {
		b.refuse--
		status = http.StatusBadRequest
	}
	b.attempts[status]++
	switch status {
	case http.StatusOK:
		b.received = append(b.received, seqs...)
	case http.StatusBadRequest:
		b.refused = append(b.refused, seqs)
	}
	b.mu.Unlock()
	switch status {
	case http.StatusOK:
		out, _ := plogotlp.NewExportResponse().MarshalProto()
		w.Header().Set("Content-Type", "application/x-protobuf")
		_, _ = w.Write(out)
	case http.StatusServiceUnavailable:
		http.Error(w, "backend down", status)
	default:
		http.Error(w, "malformed-looking batch", status)
	}
}

func (b *backend) set(status int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.status = status
}

func (b *backend) refuseNext(n int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refuse = n
}

func (b *backend) count(status int) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.attempts[status]
}

// delivered returns how many times each seq was received (answered 200).
func (b *backend) delivered() map[int64]int {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[int64]int{}
	for _, s := range b.received {
		out[s]++
	}
	return out
}

func (b *backend) refusedBatches() [][]int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.refused)
}

// logsDelivery is one run of the shipped logs configuration (plus an
// optional overlay) against a database and the backend.
type logsDelivery struct {
	t       *testing.T
	srv     *pgtest.Server
	db      string
	backend *backend
	args    []string
	env     []string
	col     *process
	next    int // the next clean dataset to break
	// lossy: the pipeline is expected to lose records (the negative check)
	lossy bool
}

func newLogsDelivery(t *testing.T, overlay string) *logsDelivery {
	t.Helper()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	srv.Psql(t, db, "-c", "CALL pgconsistency.refresh()")
	b, endpoint := startBackend(t)
	d := &logsDelivery{t: t, srv: srv, db: db, backend: b, next: 10,
		args: []string{"--config", fixture.Path("config/collector-logs.yaml")},
		env: []string{
			"PGCONSISTENCY_DB_ENDPOINT=127.0.0.1:" + strconv.Itoa(srv.Port),
			"PGCONSISTENCY_DB_USER=" + srv.User,
			"PGCONSISTENCY_DB_PASSWORD=" + srv.Password,
			"PGCONSISTENCY_DB_NAME=" + db,
			"PGCONSISTENCY_DB_TLS_INSECURE=true",
			"PGCONSISTENCY_COLLECTION_INTERVAL=" + collectionInterval.String(),
			"PGCONSISTENCY_LOGS_OTLP_ENDPOINT=" + endpoint,
			"PGCONSISTENCY_PROMETHEUS_ENDPOINT=127.0.0.1:" + strconv.Itoa(testkit.FreePort(t)),
			"PGCONSISTENCY_HEALTH_ENDPOINT=127.0.0.1:" + strconv.Itoa(testkit.FreePort(t)),
			"PGCONSISTENCY_TELEMETRY_PORT=" + strconv.Itoa(testkit.FreePort(t)),
		}}
	if overlay != "" {
		path := filepath.Join(t.TempDir(), "overlay.yaml")
		require.NoError(t, os.WriteFile(path, []byte(overlay), 0o644))
		d.args = append(d.args, "--config", path)
	}
	return d
}

func (d *logsDelivery) start() {
	d.t.Helper()
	d.col = startProcess(d.t, "collector", d.env, fixture.Path("_build/otelcol-pgconsistency"), d.args...)
}

// restart stops the collector with sig (SIGTERM: a deploy; SIGKILL: a
// crash) and starts it again.
func (d *logsDelivery) restart(sig syscall.Signal) {
	d.t.Helper()
	if sig == syscall.SIGKILL {
		require.NoError(d.t, d.col.cmd.Process.Kill())
		_ = d.col.cmd.Wait()
	} else {
		d.col.stop(d.t)
	}
	d.start()
}

func (d *logsDelivery) log() string {
	out, _ := os.ReadFile(d.col.log)
	return string(out)
}

// cursorExists: the receiver has read the database once (a new receiver
// starts at the current end: what breaks before that is not new to it).
func (d *logsDelivery) cursorExists() bool {
	var n int
	err := d.srv.Conn(d.t, d.db).QueryRow(d.t.Context(),
		"SELECT count(*) FROM pgconsistency.log_cursor WHERE consumer = 'pgconsistency'").Scan(&n)
	return err == nil && n == 1
}

// breakDatasets removes the key blocks of n clean datasets and refreshes:
// n new anomalies of dataset_key_blocks_missing.
func (d *logsDelivery) breakDatasets(n int) {
	d.t.Helper()
	for range n {
		d.srv.Psql(d.t, d.db, "-c", fmt.Sprintf("DELETE FROM public.dataset_key_blocks WHERE dataset_id = '%s'",
			fixture.DatasetID(d.next)))
		d.next++
	}
	d.srv.Psql(d.t, d.db, "-c", "CALL pgconsistency.refresh('dataset_key_blocks_missing')")
}

// anomalies returns the seqs of the anomalies in the database: the ids
// every record must arrive with.
func (d *logsDelivery) anomalies() []int64 {
	d.t.Helper()
	rows, err := d.srv.Conn(d.t, d.db).Query(d.t.Context(), "SELECT seq FROM pgconsistency.anomaly ORDER BY seq")
	require.NoError(d.t, err)
	var seqs []int64
	for rows.Next() {
		var s int64
		require.NoError(d.t, rows.Scan(&s))
		seqs = append(seqs, s)
	}
	require.NoError(d.t, rows.Err())
	return seqs
}

// outage: the backend is down (503) while anomalies appear, the collector
// has tried to export them, and it is restarted with SIGTERM (new
// anomalies appear) and then killed with SIGKILL; then the backend comes
// back. It returns the seqs of the anomalies that appeared.
func (d *logsDelivery) outage() []int64 {
	t := d.t
	t.Helper()
	d.backend.set(http.StatusServiceUnavailable)
	d.start()
	require.Eventually(t, d.cursorExists, 60*time.Second, 100*time.Millisecond, "the receiver did not read the database")
	tried := func(n int) func() bool {
		return func() bool { return d.backend.count(http.StatusServiceUnavailable) >= n }
	}

	d.breakDatasets(5)
	require.Eventually(t, tried(2), 30*time.Second, 100*time.Millisecond, "the collector did not try to export")
	// After a restart the collector tries again: the records were kept in
	// the database. Unless they were lost (lossy): then it has nothing to
	// send, and a few intervals pass instead.
	triedAgain := func(after string) {
		before := d.backend.count(http.StatusServiceUnavailable)
		if d.lossy {
			time.Sleep(3 * collectionInterval)
			return
		}
		require.Eventually(t, tried(before+2), 30*time.Second, 100*time.Millisecond, "the collector did not try again after "+after)
	}
	d.restart(syscall.SIGTERM)
	d.breakDatasets(3)
	triedAgain("SIGTERM")
	d.restart(syscall.SIGKILL)
	triedAgain("SIGKILL")
	require.Empty(t, d.backend.delivered(), "nothing can have arrived while the backend was down")

	d.backend.set(http.StatusOK)
	seqs := d.anomalies()
	require.Len(t, seqs, 8)
	return seqs
}

// TestLogsDelivery: the shipped config/collector-logs.yaml against a logs
// backend that fails. Every record arrives at least once with its id,
// across a SIGTERM and a SIGKILL of the collector while the backend is
// down; a batch the backend refuses with 400 comes again at the next
// interval with the records after it.
func TestLogsDelivery(t *testing.T) {
	t.Parallel()
	d := newLogsDelivery(t, "")
	seqs := d.outage()

	t.Run("backend down, collector restarted: every record arrives", func(t *testing.T) {
		var got map[int64]int
		if !assert.Eventually(t, func() bool {
			got = d.backend.delivered()
			return len(got) == len(seqs)
		}, 30*time.Second, 100*time.Millisecond) {
			t.Fatalf("arrived %v of the anomalies %v", slices.Sorted(maps.Keys(got)), seqs)
		}
		assert.Equal(t, seqs, slices.Sorted(maps.Keys(got)), "the ids of the records are the anomalies' seqs")
		t.Logf("%d anomalies, %d distinct records arrived (%d in all: repeats allowed), after %d refused attempts (503)",
			len(seqs), len(got), sum(got), d.backend.count(http.StatusServiceUnavailable))
		assert.NotContains(t, d.log(), "log records can be lost", "the shipped configuration draws no warning")
	})

	t.Run("a batch refused with 400 comes again with the records after it", func(t *testing.T) {
		d.backend.refuseNext(1)
		d.breakDatasets(2)
		require.Eventually(t, func() bool { return len(d.backend.refusedBatches()) == 1 }, 30*time.Second, 100*time.Millisecond,
			"the backend was not asked to take the new records")
		refused := d.backend.refusedBatches()[0]
		require.Len(t, refused, 2, "the refused request held the two new records")
		d.breakDatasets(2) // after the refusal: sent with the refused ones
		all := d.anomalies()
		require.Len(t, all, len(seqs)+4)
		var got map[int64]int
		if !assert.Eventually(t, func() bool {
			got = d.backend.delivered()
			return len(got) == len(all)
		}, 30*time.Second, 100*time.Millisecond) {
			t.Fatalf("arrived %v of the anomalies %v", slices.Sorted(maps.Keys(got)), all)
		}
		assert.Equal(t, all, slices.Sorted(maps.Keys(got)))
		assert.Subset(t, slices.Collect(maps.Keys(got)), refused, "the refused records arrived at a later interval")
		assert.Contains(t, d.log(), "the error is permanent, so no later record goes out until the backend takes these",
			"the collector says what a 400 means for the records")
		t.Logf("refused with 400: seqs %v; then all %d records arrived", refused, len(got))
	})
}

// TestLogsDeliveryEarlyAcknowledgementLosesRecords is the check of the check: the same
// outage with a batch processor put back into the logs pipeline, or with
// the exporter's in-memory sending_queue, loses records (the component
// accepts them, the receiver moves its cursor, the export fails or the
// collector stops), and the collector warns about it at start.
func TestLogsDeliveryEarlyAcknowledgementLosesRecords(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, overlay, warning string }{{
		name: "batch processor",
		overlay: `
service:
  pipelines:
    logs:
      processors: [memory_limiter, batch]
`,
		warning: `log records can be lost: in pipeline "logs", processor "batch"`,
	}, {
		name: "in-memory sending_queue",
		overlay: `
exporters:
  otlphttp/logs:
    sending_queue: {enabled: true}
`,
		warning: `log records can be lost: in pipeline "logs", exporter "otlphttp/logs" has an in-memory sending_queue`,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			d := newLogsDelivery(t, tc.overlay)
			d.lossy = true
			seqs := d.outage()
			// Long enough for the receiver to send anything it still had.
			time.Sleep(5 * collectionInterval)
			got := d.backend.delivered()
			t.Logf("with %s: %d of %d records arrived", tc.name, len(got), len(seqs))
			assert.Less(t, len(got), len(seqs), "records are lost")
			assert.Contains(t, d.log(), tc.warning, "the collector warns at start")
		})
	}
}

func sum(m map[int64]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}
