//go:build e2e

package e2e

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

// multiDatabaseConfig is one receiver watching, by discovery, every
// database of the server that has pgconsistency, exported on the
// Prometheus exporter's page, where a database no longer watched drops out
// after metric_expiration.
const multiDatabaseConfig = `
receivers:
  pgconsistency:
    endpoint: ${env:PGCONSISTENCY_DB_ENDPOINT}
    username: ${env:PGCONSISTENCY_DB_USER}
    password: ${env:PGCONSISTENCY_DB_PASSWORD}
    collection_interval: 1s
    tls: {insecure: true}
    discovery:
      enabled: true
      interval: 2s
    max_connections: ${env:PGCONSISTENCY_MAX_CONNECTIONS}
exporters:
  prometheus:
    endpoint: ${env:PGCONSISTENCY_PROMETHEUS_ENDPOINT}
    resource_to_telemetry_conversion: {enabled: true}
    metric_expiration: 3s
service:
  telemetry:
    logs: {level: info}
    metrics: {level: none}
  pipelines:
    metrics: {receivers: [pgconsistency], exporters: [prometheus]}
`

// byDatabase is the exporter's page: database → metric → invariant ("" for
// database-wide metrics) → value.
type byDatabase map[string]map[string]map[string]float64

func scrapeByDatabase(endpoint string) (byDatabase, error) {
	samples, err := testkit.Scrape("http://" + endpoint + "/metrics")
	if err != nil {
		return nil, err
	}
	out := byDatabase{}
	for _, s := range samples {
		if !strings.HasPrefix(s.Name, "pgconsistency_") || len(s.Labels) == 0 {
			continue
		}
		db := s.Labels["postgresql_database_name"]
		if out[db] == nil {
			out[db] = map[string]map[string]float64{}
		}
		if out[db][s.Name] == nil {
			out[db][s.Name] = map[string]float64{}
		}
		out[db][s.Name][s.Labels["invariant"]] = s.Value
	}
	return out, nil
}

// databasesAre says how the page differs from want (database → its
// dataset_head_ref_missing count): exactly those databases, each up = 1,
// with every invariant and the right count; "" when it does not.
func databasesAre(got byDatabase, want map[string]float64) string {
	if names := slices.Sorted(maps.Keys(got)); !slices.Equal(names, slices.Sorted(maps.Keys(want))) {
		return fmt.Sprintf("databases %v, want %v", names, slices.Sorted(maps.Keys(want)))
	}
	for db, n := range want {
		if up := got[db]["pgconsistency_up"][""]; up != 1 {
			return fmt.Sprintf("%s: pgconsistency_up = %v", db, up)
		}
		anomalies := got[db]["pgconsistency_anomalies"]
		if len(anomalies) != len(fixture.Invariants) {
			return fmt.Sprintf("%s: %d pgconsistency_anomalies series, want %d", db, len(anomalies), len(fixture.Invariants))
		}
		if v := anomalies["dataset_head_ref_missing"]; v != n {
			return fmt.Sprintf("%s: dataset_head_ref_missing = %v, want %v", db, v, n)
		}
	}
	return ""
}

// TestMultipleDatabases: one collector, one receiver with discovery, on a
// server with two databases that have pgconsistency and two that do not
// (postgres and an empty one): the series of exactly the two, up per
// database; a fourth created with pgconsistency while it runs is picked
// up; one dropped disappears with no repeated log line; the receiver's
// sessions in pg_stat_activity stay within max_connections throughout.
func TestMultipleDatabases(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	// The least-privilege role of sql/roles.sql, granted in each database
	// that has pgconsistency.
	srv.Psql(t, "", "-c", `CREATE ROLE otel_multi LOGIN PASSWORD 'e2e-secret'`)
	withPgconsistency := func(broken bool) string {
		var fixtures []string
		if broken {
			fixtures = []string{"dataset_head_ref_missing"}
		}
		db := fixture.NewDatabase(t, srv, fixtures...)
		srv.PsqlFile(t, db, fixture.Path("sql/roles.sql"))
		srv.Psql(t, db, "-c", "GRANT pgconsistency_reader TO otel_multi")
		srv.Psql(t, db, "-c", "CALL pgconsistency.refresh()")
		return db
	}
	broken := withPgconsistency(true) // dataset_head_ref_missing: 3
	clean := withPgconsistency(false)
	srv.CreateDatabase(t, "") // no pgconsistency

	// Discovery takes 1 connection, each database 2 (scrape and the changes
	// loop of refresh::changes_interval, on by default; no refresh scheduler).
	const maxConnections = 7
	conns := srv.WatchSessions(t, "otelcol-pgconsistency")
	exporter := "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t))
	config := filepath.Join(t.TempDir(), "collector.yaml")
	require.NoError(t, os.WriteFile(config, []byte(multiDatabaseConfig), 0o600))
	collector := startCollector(t, config, map[string]string{
		"PGCONSISTENCY_DB_ENDPOINT":         "127.0.0.1:" + strconv.Itoa(srv.Port),
		"PGCONSISTENCY_DB_USER":             "otel_multi",
		"PGCONSISTENCY_DB_PASSWORD":         "e2e-secret",
		"PGCONSISTENCY_MAX_CONNECTIONS":     strconv.Itoa(maxConnections),
		"PGCONSISTENCY_PROMETHEUS_ENDPOINT": exporter,
	})
	waitPage := func(what string, want map[string]float64) {
		t.Helper()
		var last string
		ok := assert.Eventually(t, func() bool {
			got, err := scrapeByDatabase(exporter)
			if err != nil {
				last = err.Error()
				return false
			}
			last = databasesAre(got, want)
			return last == ""
		}, 90*time.Second, 200*time.Millisecond)
		require.True(t, ok, "%s: %s", what, last)
	}

	waitPage("the two databases with pgconsistency", map[string]float64{broken: 3, clean: 0})

	later := withPgconsistency(true)
	waitPage("a database created while the collector runs", map[string]float64{broken: 3, clean: 0, later: 3})

	logBeforeDrop := readLog(t, collector)
	// The collector holds a connection to it: FORCE ends it.
	srv.Psql(t, "", "-c", "DROP DATABASE "+pgx.Identifier{clean}.Sanitize()+" WITH (FORCE)")
	waitPage("after the drop", map[string]float64{broken: 3, later: 3})
	time.Sleep(5 * time.Second) // five scrapes and two discoveries more
	waitPage("still after the drop", map[string]float64{broken: 3, later: 3})

	afterDrop := strings.TrimPrefix(readLog(t, collector), logBeforeDrop)
	var aboutDropped []string
	for _, line := range strings.Split(strings.TrimSpace(afterDrop), "\n") {
		if strings.Contains(line, "\terror\t") || strings.Contains(line, "\twarn\t") {
			t.Errorf("collector log after the drop has a warning or an error: %s", line)
		}
		if strings.Contains(line, clean) {
			aboutDropped = append(aboutDropped, line)
		}
	}
	assert.Len(t, aboutDropped, 1, "one line says the dropped database is no longer watched; got:\n%s", strings.Join(aboutDropped, "\n"))
	if len(aboutDropped) == 1 {
		assert.Contains(t, aboutDropped[0], "\tinfo\t")
		assert.Contains(t, aboutDropped[0], "no longer")
	}

	most := conns.Max()
	t.Logf("at most %d sessions of the collector in pg_stat_activity (max_connections %d)", most, maxConnections)
	assert.LessOrEqual(t, most, maxConnections, "the collector's sessions in pg_stat_activity")
	assert.GreaterOrEqual(t, most, 3, "the sampler saw one session per watched database")
}

func readLog(t *testing.T, p *process) string {
	t.Helper()
	b, err := os.ReadFile(p.log)
	require.NoError(t, err)
	return string(b)
}
