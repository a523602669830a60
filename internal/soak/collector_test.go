//go:build e2e

package soak

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

// appName is the application_name of the receiver's scrape connections.
const appName = "otelcol-pgconsistency"

// collector is a running _build/otelcol-pgconsistency.
type collector struct {
	cmd       *exec.Cmd
	exited    chan struct{} // closed when the process has exited
	waitErr   error         // set before exited is closed
	logPath   string
	metrics   string // the prometheus exporter's /metrics
	telemetry string // the collector's own metrics
}

// receiverConfig is one pgconsistency receiver instance of a generated configuration.
type receiverConfig struct {
	id       string // "pgconsistency" or "pgconsistency/db01"
	database string
}

// collectorConfig writes a configuration with the given receivers in one
// pipeline to the prometheus exporter, and the collector's own metrics
// (level detailed) on a pull endpoint. The password comes from the
// environment, as in the shipped configurations.
func collectorConfig(srv *pgtest.Server, receivers []receiverConfig, interval time.Duration, promPort, telemetryPort int) string {
	var w strings.Builder
	w.WriteString("receivers:\n")
	var ids []string
	for _, r := range receivers {
		ids = append(ids, r.id)
		fmt.Fprintf(&w, "  %s:\n", r.id)
		fmt.Fprintf(&w, "    endpoint: %s\n", net.JoinHostPort(srv.Host, strconv.Itoa(srv.Port)))
		fmt.Fprintf(&w, "    username: %s\n", srv.User)
		w.WriteString("    password: ${env:SOAK_DB_PASSWORD}\n")
		fmt.Fprintf(&w, "    database: %s\n", r.database)
		fmt.Fprintf(&w, "    collection_interval: %s\n", interval)
		// Just under the interval (the receiver requires it shorter): the
		// most a loaded machine can be given without overlapping scrapes.
		fmt.Fprintf(&w, "    timeout: %s\n", interval*9/10)
		w.WriteString("    tls:\n      insecure: true\n")
	}
	fmt.Fprintf(&w, `exporters:
  prometheus:
    endpoint: 127.0.0.1:%d
    resource_to_telemetry_conversion:
      enabled: true
service:
  pipelines:
    metrics:
      receivers: [%s]
      exporters: [prometheus]
  telemetry:
    logs:
      level: warn
    metrics:
      level: detailed
      readers:
        - pull:
            exporter:
              prometheus:
                host: 127.0.0.1
                port: %d
`, promPort, strings.Join(ids, ", "), telemetryPort)
	return w.String()
}

// startCollector runs the distribution with the generated configuration and
// waits until its exporter answers. A cleanup kills it if the test did not
// stop it.
func startCollector(tb testing.TB, srv *pgtest.Server, receivers []receiverConfig, interval time.Duration) *collector {
	tb.Helper()
	bin := fixture.Path("_build/otelcol-pgconsistency")
	if _, err := os.Stat(bin); err != nil {
		tb.Fatalf("the collector binary %s is missing: run `make build` (make soak does)", bin)
	}
	dir := tb.TempDir()
	promPort, telemetryPort := testkit.FreePort(tb), testkit.FreePort(tb)
	cfgPath := filepath.Join(dir, "collector.yaml")
	must(tb, os.WriteFile(cfgPath, []byte(collectorConfig(srv, receivers, interval, promPort, telemetryPort)), 0o600))
	c := &collector{
		logPath:   filepath.Join(dir, "collector.log"),
		metrics:   fmt.Sprintf("http://127.0.0.1:%d/metrics", promPort),
		telemetry: fmt.Sprintf("http://127.0.0.1:%d/metrics", telemetryPort),
		exited:    make(chan struct{}),
	}
	log, err := os.Create(c.logPath)
	must(tb, err)
	c.cmd = exec.Command(bin, "--config", cfgPath)
	c.cmd.Env = append(os.Environ(), "SOAK_DB_PASSWORD="+srv.Password)
	c.cmd.Stdout, c.cmd.Stderr = log, log
	must(tb, c.cmd.Start())
	go func() {
		c.waitErr = c.cmd.Wait()
		log.Close()
		close(c.exited)
	}()
	tb.Cleanup(func() {
		select {
		case <-c.exited:
		default:
			_ = c.cmd.Process.Kill()
			<-c.exited
		}
	})
	waitFor(tb, time.Minute, "the collector's exporter to answer at "+c.metrics, func() (bool, string) {
		select {
		case <-c.exited:
			tb.Fatalf("the collector exited at start: %v\n%s", c.waitErr, c.logTail())
		default:
		}
		_, err := get(c.metrics)
		if err != nil {
			return false, err.Error()
		}
		return true, ""
	})
	return c
}

// stop sends SIGTERM and requires a clean exit within a minute.
func (c *collector) stop(tb testing.TB) {
	tb.Helper()
	must(tb, c.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-c.exited:
	case <-time.After(time.Minute):
		_ = c.cmd.Process.Kill()
		<-c.exited
		tb.Fatalf("the collector did not exit within a minute of SIGTERM\n%s", c.logTail())
	}
	if c.waitErr != nil {
		tb.Fatalf("the collector exited with %v after SIGTERM\n%s", c.waitErr, c.logTail())
	}
}

func (c *collector) pid() int { return c.cmd.Process.Pid }

func (c *collector) logTail() string {
	data, _ := os.ReadFile(c.logPath)
	const limit = 6000
	if len(data) > limit {
		data = data[len(data)-limit:]
	}
	return "collector log (end):\n" + string(data)
}

// scrapeSamples GETs a /metrics endpoint and parses it.
func scrapeSamples(tb testing.TB, url string) []testkit.Sample {
	tb.Helper()
	s, err := testkit.Scrape(url)
	if err != nil {
		tb.Fatalf("GET %s: %v", url, err)
	}
	return s
}

func get(url string) (string, error) {
	client := &http.Client{Timeout: 30 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", errors.New(resp.Status)
	}
	return string(body), nil
}

// connections counts the receiver's scrape connections per database, over a
// connection of its own (which has another application_name), so it works
// across server restarts.
func connections(tb testing.TB, srv *pgtest.Server) map[string]int {
	tb.Helper()
	ctx, cancel := context.WithTimeout(tb.Context(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, srv.DSN(""))
	if err != nil {
		tb.Fatalf("connecting to count the collector's connections: %v", err)
	}
	defer conn.Close(context.Background())
	rows, err := conn.Query(ctx, `SELECT datname, count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1 GROUP BY datname`, appName)
	must(tb, err)
	out := map[string]int{}
	for rows.Next() {
		var db string
		var n int
		must(tb, rows.Scan(&db, &n))
		out[db] = n
	}
	must(tb, rows.Err())
	return out
}

func sumConns(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// waitFor polls cond every 100 ms until it holds, failing the test with the
// last reason after timeout.
func waitFor(tb testing.TB, timeout time.Duration, what string, cond func() (bool, string)) time.Duration {
	tb.Helper()
	start := time.Now()
	for {
		ok, why := cond()
		if ok {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			tb.Fatalf("waited %s for %s: %s", timeout, what, why)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func must(tb testing.TB, err error) {
	tb.Helper()
	if err != nil {
		tb.Fatal(err)
	}
}

func mib(kib int64) string { return fmt.Sprintf("%.1f MiB", float64(kib)/1024) }

// logf prints progress to stderr, apart from the tables on stdout.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "soak: "+format+"\n", args...)
}
