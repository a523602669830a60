//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

// refusalTimeout is how long a refused configuration may take to stop the
// collector; it stops in well under a second when the machine is idle.
const refusalTimeout = 20 * time.Second

func collectorBinary(t *testing.T) string {
	t.Helper()
	bin := fixture.Path("_build/otelcol-pgconsistency")
	_, err := os.Stat(bin)
	require.NoError(t, err, "the collector is not built: run `make build` (make test does)")
	return bin
}

// receiverField is one key of the receiver's configuration, its value in
// YAML (flow style for maps).
type receiverField struct{ key, value string }

// validReceiver is a receiver configuration the collector accepts; each
// case changes it in one way.
var validReceiver = []receiverField{
	{"endpoint", "127.0.0.1:5432"},
	{"username", "otel"},
	{"database", "app"},
	{"collection_interval", "1m"},
	{"tls", "{insecure: true}"},
}

// collectorConfig is a whole collector configuration around the receiver
// fields: a metrics pipeline into exporter (a YAML flow map under its name),
// telemetry metrics off (no port taken), logs at logLevel.
func collectorConfig(fields []receiverField, exporter, logLevel string) string {
	var b strings.Builder
	b.WriteString("receivers:\n  pgconsistency:\n")
	for _, f := range fields {
		fmt.Fprintf(&b, "    %s: %s\n", f.key, f.value)
	}
	fmt.Fprintf(&b, `exporters:
  %s
service:
  telemetry:
    logs: {level: %s}
    metrics: {level: none}
  pipelines:
    metrics: {receivers: [pgconsistency], exporters: [%s]}
`, exporter, logLevel, strings.SplitN(exporter, ":", 2)[0])
	return b.String()
}

// with returns validReceiver with the given fields set (replaced, or added
// at the end) and the keys in drop removed.
func with(set []receiverField, drop ...string) []receiverField {
	var out []receiverField
	for _, f := range validReceiver {
		replaced := false
		for _, s := range set {
			if s.key == f.key {
				replaced = true
			}
		}
		if !replaced && !containsString(drop, f.key) {
			out = append(out, f)
		}
	}
	return append(out, set...)
}

func containsString(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
	return path
}

// TestBadConfig: the real collector, given a configuration with one mistake,
// exits with a non-zero status within refusalTimeout (it is not left
// running), and its stderr names the key and says how to fix it.
func TestBadConfig(t *testing.T) {
	t.Parallel()
	bin := collectorBinary(t)
	missingSecret := filepath.Join(t.TempDir(), "no-such-secret")
	tests := []struct {
		name   string
		fields []receiverField
		// want are fragments of stderr: the key, then the hint of the fix.
		want []string
	}{
		{name: "empty endpoint", fields: with([]receiverField{{"endpoint", `""`}}),
			want: []string{`"endpoint" must be set`, `host:port of the PostgreSQL server, e.g. localhost:5432`}},
		{name: "endpoint without port", fields: with([]receiverField{{"endpoint", "db.internal"}}),
			want: []string{`"endpoint" "db.internal" must be host:port`, `e.g. localhost:5432`}},
		{name: "endpoint with a bad port", fields: with([]receiverField{{"endpoint", "db.internal:postgres"}}),
			want: []string{`"endpoint" "db.internal:postgres" has an invalid port "postgres"`, `expected a number from 1 to 65535`}},
		{name: "unsupported transport", fields: with([]receiverField{{"transport", "udp"}}),
			want: []string{`"transport" "udp" is not supported`, `use "tcp"`}},
		{name: "duration with words", fields: with([]receiverField{{"collection_interval", "5 minutes"}}),
			want: []string{`'collection_interval' time: unknown unit`}},
		{name: "timeout equal to collection_interval", fields: with([]receiverField{{"collection_interval", "10s"}, {"timeout", "10s"}}),
			want: []string{`"timeout" (10s) must be shorter than "collection_interval" (10s)`, `lower "timeout", or remove it`}},
		{name: "timeout above collection_interval", fields: with([]receiverField{{"collection_interval", "250ms"}, {"timeout", "10s"}}),
			want: []string{`"timeout" (10s) must be shorter than "collection_interval" (250ms)`, `lower "timeout", or remove it`}},
		{name: "unknown key", fields: with([]receiverField{{"passwrd", "s3cret"}}),
			want: []string{`has invalid keys: passwrd`}},
		{name: "unknown key in refresh", fields: with([]receiverField{{"refresh", "{schedul: 1m}"}}),
			want: []string{`'refresh' has invalid keys: schedul`}},
		{name: "schema other than pgconsistency", fields: with([]receiverField{{"schema", `'pg"consistency'`}}),
			want: []string{`"schema" "pg\"consistency" is not supported`, `remove "schema" (it is deprecated)`}},
		{name: "schema with a space", fields: with([]receiverField{{"schema", `"pg consistency"`}}),
			want: []string{`"schema" "pg consistency" is not supported: sql/install.sql installs pgconsistency into schema "pgconsistency"`}},
		{name: "password and password_file", fields: with([]receiverField{{"password", "s3cret"}, {"password_file", "/run/secrets/pg"}}),
			want: []string{`"password" and "password_file" are both set: keep one`}},
		{name: "password_file unreadable at start", fields: with([]receiverField{{"password_file", missingSecret}}),
			want: []string{`"password_file": cannot read the password from "` + missingSecret + `"`, `check the path`}},
		{name: "missing username", fields: with(nil, "username"),
			want: []string{`"username" must be set`, `the PostgreSQL role the receiver logs in as`}},
		{name: "missing database", fields: with(nil, "database"),
			want: []string{`"database" must be set`, `where sql/install.sql installed pgconsistency`}},
		{name: "database and databases", fields: with([]receiverField{{"databases", "[billing]"}}),
			want: []string{`"database", "databases" and "discovery::enabled" are exclusive`}},
		{name: "databases over max_connections", fields: with([]receiverField{{"databases", "[app, billing, audit]"}, {"max_connections", "2"}}, "database"),
			want: []string{`"max_connections" (2) is too low for the 3 databases of "databases"`, `raise "max_connections" to 6`}},
		{name: "negative max_records_per_interval", fields: with([]receiverField{{"logs", "{max_records_per_interval: -1}"}}),
			want: []string{`"logs::max_records_per_interval" (-1) must be at least 1`}},
		{name: "negative refresh poll_interval", fields: with([]receiverField{{"refresh", "{poll_interval: -1m}"}}),
			want: []string{`"refresh::poll_interval" (-1m0s) must be positive, e.g. 1m, or 0 to leave refreshes to pg_cron`}},
		{name: "refresh schedule and poll_interval", fields: with([]receiverField{{"refresh", "{schedule: 1m, poll_interval: 1m}"}}),
			want: []string{`"refresh::schedule" and "refresh::poll_interval" are both set`, `keep only "refresh::poll_interval"`}},
		{name: "deploy marker without poll_interval", fields: with([]receiverField{{"refresh", "{deploy_marker: {query: SELECT 1, delay: 5m}}"}}),
			want: []string{`"refresh::deploy_marker::query" needs "refresh::poll_interval"`}},
		{name: "negative deploy marker delay", fields: with([]receiverField{{"refresh", "{poll_interval: 1m, deploy_marker: {query: SELECT 1, delay: -5m}}"}}),
			want: []string{`"refresh::deploy_marker::delay" (-5m0s) must be zero or more`}},
		{name: "wal_stream flush_delay too long", fields: with([]receiverField{{"refresh", "{wal_stream: {enabled: true, flush_delay: 1m}}"}}),
			want: []string{`"refresh::wal_stream::flush_delay" (1m0s) must be between 0 (the default, 1s) and 10s`}},
		{name: "wal_stream settings while off", fields: with([]receiverField{{"refresh", "{wal_stream: {endpoint: db-primary:5432}}"}}),
			want: []string{`"refresh::wal_stream" has settings but is off`, `set "refresh::wal_stream::enabled: true"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			config := writeFile(t, "config.yaml", collectorConfig(tt.fields, "debug: {}", "info"))
			ctx, cancel := context.WithTimeout(context.Background(), refusalTimeout)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin, "--config", config)
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			cmd.WaitDelay = 5 * time.Second
			began := time.Now()
			err := cmd.Run()
			took := time.Since(began)
			require.NoError(t, ctx.Err(), "the collector was still running %s after starting with a bad configuration (killed);\nconfig:\n%s\nstderr:\n%s",
				refusalTimeout, collectorConfig(tt.fields, "debug: {}", "info"), tail(stderr.String(), 20))
			var exit *exec.ExitError
			require.True(t, errors.As(err, &exit), "the collector must exit with an error status, got %v; stderr:\n%s", err, stderr.String())
			assert.NotZero(t, exit.ExitCode())
			for _, want := range tt.want {
				assert.Contains(t, stderr.String(), want, "stdout:\n%s", stdout.String())
			}
			// Never a password nor a connection string, at any level.
			output := stdout.String() + stderr.String()
			for _, f := range tt.fields {
				if f.key == "password" {
					assert.NotContains(t, output, f.value, "the collector's output contains the password")
				}
			}
			assert.NotRegexp(t, connectionString, output, "the collector's output contains a connection string")
			t.Logf("refused in %s with exit status %d", took.Round(time.Millisecond), exit.ExitCode())
		})
	}
}

// connectionString matches a libpq connection string with credentials,
// URL or key/value, in a log.
var connectionString = regexp.MustCompile(`postgres(ql)?://[^\s/]*@|\bpassword\s*=`)

func randomPassword(t *testing.T) string {
	t.Helper()
	b := make([]byte, 12)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return "pw-" + hex.EncodeToString(b)
}

// TestPasswordFileThroughCollector: the collector binary logs in with the
// password of password_file (metrics appear on the Prometheus exporter),
// and with a wrong password, from password_file or from ${env:…}, it
// reports the failure; in every case, at debug level, its output never
// contains the password.
func TestPasswordFileThroughCollector(t *testing.T) {
	t.Parallel()
	bin := collectorBinary(t)
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv, fixture.Invariants...)
	srv.Psql(t, db, "-c", "CALL pgconsistency.refresh()")
	password := randomPassword(t)
	srv.Psql(t, db, "-c", fmt.Sprintf(`CREATE ROLE otel_pgconsistency LOGIN PASSWORD '%s';
		GRANT USAGE ON SCHEMA pgconsistency TO otel_pgconsistency;
		GRANT SELECT ON pgconsistency.status TO otel_pgconsistency;`, password))

	receiver := func(extra ...receiverField) []receiverField {
		return append([]receiverField{
			{"endpoint", "127.0.0.1:" + strconv.Itoa(srv.Port)},
			{"username", "otel_pgconsistency"},
			{"database", db},
			{"collection_interval", collectionInterval.String()},
			{"tls", "{insecure: true}"},
		}, extra...)
	}
	// run starts the collector and returns it and a reader of its output;
	// with wantMetrics, once the exporter shows every invariant's count.
	run := func(t *testing.T, fields []receiverField, env []string, wantMetrics bool) (*process, func() string) {
		t.Helper()
		exporter := "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t))
		config := writeFile(t, "config.yaml", collectorConfig(fields, "prometheus: {endpoint: "+exporter+"}", "debug"))
		p := startProcess(t, "otelcol", env, bin, "--config", config)
		output := func() string {
			b, err := os.ReadFile(p.log)
			require.NoError(t, err)
			return string(b)
		}
		if wantMetrics {
			want := fixture.Counts[float64]()
			var last map[string]float64
			if !assert.Eventually(t, func() bool {
				got, _, err := scrapeExporter(exporter)
				last = got
				return err == nil && assert.ObjectsAreEqual(want, got)
			}, 90*time.Second, 500*time.Millisecond) {
				t.Fatalf("pgconsistency_anomalies on the exporter: got %v, want %v", last, want)
			}
		}
		return p, output
	}
	waitForOutput := func(t *testing.T, output func() string, what string) {
		t.Helper()
		require.Eventually(t, func() bool { return strings.Contains(output(), what) },
			60*time.Second, 200*time.Millisecond, "the collector never logged %q; output:\n%s", what, tail(output(), 20))
	}

	t.Run("right password from password_file", func(t *testing.T) {
		secret := writeFile(t, "password", password+"\n")
		p, output := run(t, receiver(receiverField{"password_file", secret}), nil, true)
		p.stop(t)
		out := output()
		assert.Contains(t, out, "\tdebug\t", "the collector did not log at debug level: the check below would prove less")
		assert.NotContains(t, out, password, "the collector's output contains the password")
	})
	t.Run("wrong password from password_file", func(t *testing.T) {
		wrong := randomPassword(t)
		secret := writeFile(t, "password", wrong+"\n")
		p, output := run(t, receiver(receiverField{"password_file", secret}), nil, false)
		waitForOutput(t, output, "password authentication failed")
		p.stop(t)
		assert.NotContains(t, output(), wrong, "the collector's output contains the password")
	})
	t.Run("wrong password from env", func(t *testing.T) {
		wrong := randomPassword(t)
		p, output := run(t, receiver(receiverField{"password", "${env:PGCONSISTENCY_E2E_PASSWORD}"}),
			[]string{"PGCONSISTENCY_E2E_PASSWORD=" + wrong}, false)
		waitForOutput(t, output, "password authentication failed")
		p.stop(t)
		assert.NotContains(t, output(), wrong, "the collector's output contains the password")
	})
	t.Run("database down", func(t *testing.T) {
		srv.Stop(t)
		wrong := randomPassword(t)
		secret := writeFile(t, "password", wrong+"\n")
		p, output := run(t, receiver(receiverField{"password_file", secret}), nil, false)
		waitForOutput(t, output, "connection refused")
		p.stop(t)
		assert.NotContains(t, output(), wrong, "the collector's output contains the password")
	})
}
