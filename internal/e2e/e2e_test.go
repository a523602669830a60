//go:build e2e

// Package e2e runs the whole path with real parts: a PostgreSQL cluster with
// the fixtures, the collector binary built from builder-config.yaml with the
// shipped configurations, a real Prometheus receiving remote write, and the
// Prometheus exporter's scrape endpoint.
//
// It needs _build/otelcol-pgconsistency (make build) and prometheus on PATH
// (make test installs both).
//
// Every test has its own cluster, processes, ports (testkit.FreePort) and
// directories, and spends most of its time waiting (scrape and evaluation
// intervals, alert "for" durations, refresh periods): they run in parallel
// (t.Parallel), go test's -parallel at a time. A new test must set every
// port and directory of the configurations it runs (the shipped ones fall
// back to fixed defaults: 13133, 8888, ./_data).
package e2e

import (
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

const collectionInterval = time.Second

// process is a child process whose output goes to a file kept for failures.
type process struct {
	cmd *exec.Cmd
	log string
}

func startProcess(t *testing.T, name string, env []string, bin string, args ...string) *process {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), name+".log")
	logFile, err := os.Create(logPath)
	require.NoError(t, err)
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	require.NoError(t, cmd.Start(), "starting %s", name)
	p := &process{cmd: cmd, log: logPath}
	t.Cleanup(func() {
		p.stop(t)
		logFile.Close()
		if t.Failed() {
			out, _ := os.ReadFile(logPath)
			t.Logf("%s log (tail):\n%s", name, tail(string(out), 40))
		}
	})
	return p
}

// stop terminates the process gracefully and waits for it; safe to repeat.
func (p *process) stop(t *testing.T) {
	if p.cmd.ProcessState != nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-done
		t.Errorf("%s did not stop within 30s of SIGTERM", p.cmd.Path)
	}
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

type prometheus struct {
	t      *testing.T
	port   int
	dir    string
	config string
	flags  []string
	proc   *process
}

func startPrometheus(t *testing.T) *prometheus {
	t.Helper()
	return startPrometheusWith(t, "global:\n  evaluation_interval: 1s\n")
}

// startPrometheusWith starts Debian's Prometheus with the given configuration
// file contents and extra flags, accepting remote write.
func startPrometheusWith(t *testing.T, config string, flags ...string) *prometheus {
	t.Helper()
	bin, err := exec.LookPath("prometheus")
	require.NoError(t, err, "prometheus is not installed: run `make test` as root (it installs Debian's prometheus)")
	dir := t.TempDir()
	path := filepath.Join(dir, "prometheus.yml")
	require.NoError(t, os.WriteFile(path, []byte(config), 0o644))
	p := &prometheus{t: t, port: testkit.FreePort(t), dir: dir, config: path, flags: flags}
	p.start(bin)
	return p
}

func (p *prometheus) start(bin string) {
	p.t.Helper()
	p.proc = startProcess(p.t, "prometheus", nil, bin, append([]string{
		"--config.file=" + p.config,
		"--storage.tsdb.path=" + filepath.Join(p.dir, "data"),
		"--web.listen-address=127.0.0.1:" + strconv.Itoa(p.port),
		"--web.enable-remote-write-receiver"}, p.flags...)...)
	require.Eventually(p.t, func() bool {
		resp, err := http.Get(p.url("/-/ready"))
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 60*time.Second, 200*time.Millisecond, "prometheus did not become ready")
}

func (p *prometheus) url(path string) string {
	return "http://127.0.0.1:" + strconv.Itoa(p.port) + path
}

type sample struct {
	labels map[string]string
	value  float64
}

// query runs an instant PromQL query (at time at, if not zero).
func (p *prometheus) query(promql string, at time.Time) ([]sample, error) {
	v := url.Values{"query": {promql}}
	if !at.IsZero() {
		v.Set("time", strconv.FormatFloat(float64(at.UnixMilli())/1000, 'f', 3, 64))
	}
	resp, err := http.Get(p.url("/api/v1/query?" + v.Encode()))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var body struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []struct {
				Metric map[string]string `json:"metric"`
				Value  [2]any            `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return nil, err
	}
	if body.Status != "success" {
		return nil, fmt.Errorf("query %q: %s", promql, body.Error)
	}
	var out []sample
	for _, r := range body.Data.Result {
		f, err := strconv.ParseFloat(r.Value[1].(string), 64)
		if err != nil {
			return nil, err
		}
		out = append(out, sample{labels: r.Metric, value: f})
	}
	return out, nil
}

func startCollector(t *testing.T, config string, env map[string]string) *process {
	t.Helper()
	bin := fixture.Path("_build/otelcol-pgconsistency")
	_, err := os.Stat(bin)
	require.NoError(t, err, "the collector is not built: run `make build` (make test does)")
	var envList []string
	for _, k := range slices.Sorted(maps.Keys(env)) {
		envList = append(envList, k+"="+env[k])
	}
	if !filepath.IsAbs(config) {
		config = fixture.Path(config)
	}
	return startProcess(t, filepath.Base(config), envList, bin, "--config", config)
}

func byInvariant(samples []sample) map[string]float64 {
	got := map[string]float64{}
	for _, s := range samples {
		got[s.labels["invariant"]] = s.value
	}
	return got
}

// scrapeExporter returns the pgconsistency_anomalies values of the exporter's
// /metrics page, by invariant, and the labels of one such series.
func scrapeExporter(endpoint string) (map[string]float64, map[string]string, error) {
	samples, err := testkit.Scrape("http://" + endpoint + "/metrics")
	if err != nil {
		return nil, nil, err
	}
	got := map[string]float64{}
	var labels map[string]string
	for _, s := range testkit.Named(samples, "pgconsistency_anomalies") {
		labels = s.Labels
		got[labels["invariant"]] = s.Value
	}
	return got, labels, nil
}

func TestEndToEnd(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv, fixture.Invariants...)
	srv.Psql(t, db, "-c", "CALL pgconsistency.refresh()")
	// The shipped least-privilege setup: sql/roles.sql and its reader role.
	srv.PsqlFile(t, db, fixture.Path("sql/roles.sql"))
	srv.Psql(t, db, "-c", `CREATE ROLE otel_pgconsistency LOGIN PASSWORD 'e2e-secret';
		GRANT pgconsistency_reader TO otel_pgconsistency;`)
	prom := startPrometheus(t)

	dbEnv := map[string]string{
		"PGCONSISTENCY_DB_ENDPOINT":         "127.0.0.1:" + strconv.Itoa(srv.Port),
		"PGCONSISTENCY_DB_USER":             "otel_pgconsistency",
		"PGCONSISTENCY_DB_PASSWORD":         "e2e-secret",
		"PGCONSISTENCY_DB_NAME":             db,
		"PGCONSISTENCY_DB_TLS_INSECURE":     "true",
		"PGCONSISTENCY_COLLECTION_INTERVAL": collectionInterval.String(),
	}
	rwEnv := maps.Clone(dbEnv)
	rwEnv["PGCONSISTENCY_REMOTE_WRITE_URL"] = prom.url("/api/v1/write")
	rwEnv["PGCONSISTENCY_WAL_DIR"] = filepath.Join(t.TempDir(), "wal")
	rwEnv["PGCONSISTENCY_HEALTH_ENDPOINT"] = "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t))
	rwEnv["PGCONSISTENCY_TELEMETRY_PORT"] = strconv.Itoa(testkit.FreePort(t))
	startCollector(t, "config/collector-remotewrite.yaml", rwEnv)

	exporterEndpoint := "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t))
	peEnv := maps.Clone(dbEnv)
	peEnv["PGCONSISTENCY_PROMETHEUS_ENDPOINT"] = exporterEndpoint
	peEnv["PGCONSISTENCY_HEALTH_ENDPOINT"] = "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t))
	peEnv["PGCONSISTENCY_TELEMETRY_PORT"] = strconv.Itoa(testkit.FreePort(t))
	startCollector(t, "config/collector-prometheus.yaml", peEnv)

	want := fixture.Counts[float64]()
	dbSelector := fmt.Sprintf(`postgresql_database_name=%q`, db)

	t.Run("remote write into Prometheus", func(t *testing.T) {
		var last map[string]float64
		if !assert.Eventually(t, func() bool {
			s, err := prom.query("pgconsistency_anomalies{"+dbSelector+"}", time.Time{})
			if err != nil {
				return false
			}
			last = byInvariant(s)
			return assert.ObjectsAreEqual(want, last)
		}, 90*time.Second, 500*time.Millisecond) {
			t.Fatalf("pgconsistency_anomalies in Prometheus: got %v, want %v", last, want)
		}

		s, err := prom.query("pgconsistency_up{"+dbSelector+"}", time.Time{})
		require.NoError(t, err)
		require.Len(t, s, 1)
		assert.Equal(t, 1.0, s[0].value)
		assert.Equal(t, "127.0.0.1", s[0].labels["server_address"])
		assert.Equal(t, strconv.Itoa(srv.Port), s[0].labels["server_port"])
		for _, name := range []string{"pgconsistency_anomalies_new", "pgconsistency_snapshot_timestamp_seconds",
			"pgconsistency_refresh_duration_seconds", "pgconsistency_refresh_failures"} {
			s, err := prom.query(name+"{"+dbSelector+"}", time.Time{})
			require.NoError(t, err)
			assert.Len(t, s, len(fixture.Invariants), name)
		}
	})

	t.Run("Prometheus exporter scrape endpoint", func(t *testing.T) {
		var last map[string]float64
		var labels map[string]string
		if !assert.Eventually(t, func() bool {
			got, l, err := scrapeExporter(exporterEndpoint)
			if err != nil {
				return false
			}
			last, labels = got, l
			return assert.ObjectsAreEqual(want, got)
		}, 60*time.Second, 500*time.Millisecond) {
			t.Fatalf("pgconsistency_anomalies on /metrics: got %v, want %v", last, want)
		}
		assert.Equal(t, db, labels["postgresql_database_name"])
		assert.Contains(t, []string{"critical", "warning"}, labels["severity"])
	})

	t.Run("a Prometheus outage loses nothing", func(t *testing.T) {
		bin, err := exec.LookPath("prometheus")
		require.NoError(t, err)
		prom.proc.stop(t)
		down := time.Now()
		// Several collection intervals with nowhere to send to.
		time.Sleep(8 * collectionInterval)
		up := time.Now()
		prom.start(bin)

		// Every collection in the outage must arrive: one pgconsistency_up
		// sample per interval between down and up (minus one for the edges).
		window := up.Sub(down)
		minSamples := math.Floor(window.Seconds()/collectionInterval.Seconds()) - 1
		promql := fmt.Sprintf("count_over_time(pgconsistency_up{%s}[%dms])", dbSelector, window.Milliseconds())
		var got float64
		if !assert.Eventually(t, func() bool {
			s, err := prom.query(promql, up)
			if err != nil || len(s) != 1 {
				return false
			}
			got = s[0].value
			return got >= minSamples
		}, 120*time.Second, time.Second) {
			t.Fatalf("samples of pgconsistency_up from the %s outage: got %v, want at least %v", window, got, minSamples)
		}
		t.Logf("outage of %s: %v samples of pgconsistency_up from inside it arrived after Prometheus came back (at least %v expected)",
			window.Round(time.Millisecond), got, minSamples)
	})
}

// TestShippedConfigsValidate: every collector configuration in config/ is
// accepted by the built collector, and a bad one is refused naming the key.
func TestShippedConfigsValidate(t *testing.T) {
	t.Parallel()
	bin := fixture.Path("_build/otelcol-pgconsistency")
	configs, err := filepath.Glob(fixture.Path("config/collector-*.yaml"))
	require.NoError(t, err)
	require.GreaterOrEqual(t, len(configs), 3)
	for _, c := range configs {
		cmd := exec.Command(bin, "validate", "--config", c)
		cmd.Env = append(os.Environ(), "PGCONSISTENCY_DB_PASSWORD=unused")
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s: %s", c, out)
	}

	bad := filepath.Join(t.TempDir(), "bad.yaml")
	require.NoError(t, os.WriteFile(bad, []byte(`receivers:
  pgconsistency:
    endpoint: db.internal
    username: otel
    collection_interval: 1m
exporters:
  debug: {}
service:
  pipelines:
    metrics: {receivers: [pgconsistency], exporters: [debug]}
`), 0o644))
	out, err := exec.Command(bin, "validate", "--config", bad).CombinedOutput()
	require.Error(t, err, "a bad configuration must be refused")
	require.Contains(t, string(out), `"endpoint" "db.internal" must be host:port`)
	require.Contains(t, string(out), `"database" must be set`)
}
