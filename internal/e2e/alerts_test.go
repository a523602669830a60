//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.yaml.in/yaml/v3"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

// alertState is one alert instance as Prometheus's /api/v1/alerts shows it.
type alertState struct {
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations"`
	State       string            `json:"state"`
}

// active returns the alert instance of alert and invariant that
// Prometheus shows pending or firing, if any.
func (p *prometheus) active(alert, invariant string) (alertState, bool, error) {
	alerts, err := p.alerts()
	for _, a := range alerts {
		if a.Labels["alertname"] == alert && a.Labels["invariant"] == invariant {
			return a, true, err
		}
	}
	return alertState{}, false, err
}

func (p *prometheus) alerts() ([]alertState, error) {
	resp, err := http.Get(p.url("/api/v1/alerts"))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var body struct {
		Data struct {
			Alerts []alertState `json:"alerts"`
		} `json:"data"`
	}
	return body.Data.Alerts, json.NewDecoder(resp.Body).Decode(&body)
}

// alertWatch records, for each alert name and invariant, when Prometheus
// first showed it pending and firing.
type alertWatch struct {
	mu    sync.Mutex
	first map[string]map[string]time.Time // "alertname/invariant" -> state -> time
	stop  chan struct{}
	done  chan struct{}
}

func watchAlerts(t *testing.T, prom *prometheus) *alertWatch {
	w := &alertWatch{first: map[string]map[string]time.Time{}, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			if alerts, err := prom.alerts(); err == nil {
				now := time.Now()
				w.mu.Lock()
				for _, a := range alerts {
					key := a.Labels["alertname"] + "/" + a.Labels["invariant"]
					if w.first[key] == nil {
						w.first[key] = map[string]time.Time{}
					}
					if _, seen := w.first[key][a.State]; !seen {
						w.first[key][a.State] = now
					}
				}
				w.mu.Unlock()
			}
			select {
			case <-w.stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() { close(w.stop); <-w.done })
	return w
}

// seen returns when the alert (any invariant when invariant is "*") was first
// in state, and whether it was.
func (w *alertWatch) seen(alert, invariant, state string) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for key, states := range w.first {
		name, inv, _ := strings.Cut(key, "/")
		if name == alert && (invariant == "*" || inv == invariant) {
			if at, ok := states[state]; ok {
				return at, true
			}
		}
	}
	return time.Time{}, false
}

func (w *alertWatch) waitFor(t *testing.T, alert, invariant, state string, within time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		if at, ok := w.seen(alert, invariant, state); ok {
			return at
		}
		time.Sleep(100 * time.Millisecond)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	t.Fatalf("%s{invariant=%q} was not %s within %s; seen: %v", alert, invariant, state, within, w.first)
	return time.Time{}
}

var forDuration = regexp.MustCompile(`(?m)^(\s+for:) \S+$`)

// testRules writes the shipped rules with every "for:" shortened to 3s.
func testRules(t *testing.T, dir string) string {
	t.Helper()
	rules, err := os.ReadFile(fixture.Path("config/prometheus-rules.yaml"))
	require.NoError(t, err)
	short := forDuration.ReplaceAll(rules, []byte("$1 3s"))
	require.NotEqual(t, string(rules), string(short))
	path := filepath.Join(dir, "rules.yaml")
	require.NoError(t, os.WriteFile(path, short, 0o644))
	return path
}

// startAlertmanager runs Debian's Alertmanager with the shipped example
// configuration, if it is installed.
func startAlertmanager(t *testing.T) (string, bool) {
	t.Helper()
	bin, err := exec.LookPath("prometheus-alertmanager")
	if err != nil {
		if bin, err = exec.LookPath("alertmanager"); err != nil {
			t.Log("Alertmanager is not installed: the alerts are checked in Prometheus only")
			return "", false
		}
	}
	addr := "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t))
	startProcess(t, "alertmanager", nil, bin,
		"--config.file="+fixture.Path("config/alertmanager.yml"),
		"--storage.path="+t.TempDir(),
		"--web.listen-address="+addr,
		"--cluster.listen-address=") // no gossip: a single instance
	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + addr + "/-/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 30*time.Second, 200*time.Millisecond, "alertmanager did not become ready")
	return addr, true
}

// alertmanagerReceivers returns the receivers Alertmanager routed the
// active alert of alert and invariant to (nil while it has none).
func alertmanagerReceivers(addr, alert, invariant string) []string {
	v := url.Values{"filter": {fmt.Sprintf("alertname=%q", alert), fmt.Sprintf("invariant=%q", invariant)}}
	resp, err := http.Get("http://" + addr + "/api/v2/alerts?" + v.Encode())
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	var alerts []struct {
		Receivers []struct {
			Name string `json:"name"`
		} `json:"receivers"`
	}
	if json.NewDecoder(resp.Body).Decode(&alerts) != nil {
		return nil
	}
	var out []string
	for _, a := range alerts {
		for _, r := range a.Receivers {
			out = append(out, r.Name)
		}
	}
	return out
}

func alertmanagerHas(addr, alert string) bool {
	v := url.Values{"filter": {fmt.Sprintf("alertname=%q", alert)}}
	resp, err := http.Get("http://" + addr + "/api/v2/alerts?" + v.Encode())
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var alerts []struct {
		Labels map[string]string `json:"labels"`
	}
	return json.NewDecoder(resp.Body).Decode(&alerts) == nil && len(alerts) > 0
}

// TestAlerts runs the shipped alert rules in a real Prometheus fed by the real
// collector: a broken dataset makes the new-anomaly alert go pending then
// firing (and reach Alertmanager), stopped refreshes make snapshots stale, a
// stopped database and a stopped collector raise their alerts. Owners:
// the alerts carry the invariant's owner and runbook, Alertmanager routes
// them to the owner's receiver, and an alert resolves once its anomalies
// are fixed or acknowledged.
func TestAlerts(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)
	conn := srv.Conn(t, db)
	// Owners, as config/alertmanager.yml routes them: team-a's critical
	// invariant, team-b's warning one (with the generic runbook).
	const teamARunbook = "https://wiki.example.com/runbooks/head-ref"
	_, err := conn.Exec(t.Context(), "SELECT pgconsistency.set_owner('dataset_head_ref_missing', 'team-a', $1)", teamARunbook)
	require.NoError(t, err)
	_, err = conn.Exec(t.Context(), "SELECT pgconsistency.set_owner('dataset_statistics_missing', 'team-b', NULL)")
	require.NoError(t, err)
	// Refresh every 10 s: snapshots are stale after 3 periods (30 s).
	_, err = conn.Exec(t.Context(), "UPDATE pgconsistency.invariant SET refresh_period = '10 seconds'")
	require.NoError(t, err)
	_, err = conn.Exec(t.Context(), "CALL pgconsistency.refresh()")
	require.NoError(t, err)

	// The refresh schedule: CALL refresh() every second refreshes what is due.
	refreshCtx, stopRefreshes := context.WithCancel(context.Background())
	refreshesDone := make(chan struct{})
	go func() {
		defer close(refreshesDone)
		rc, err := pgx.Connect(refreshCtx, srv.DSN(db))
		if err != nil {
			return
		}
		defer rc.Close(context.Background())
		for refreshCtx.Err() == nil {
			_, _ = rc.Exec(refreshCtx, "CALL pgconsistency.refresh()")
			select {
			case <-refreshCtx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
	t.Cleanup(func() { stopRefreshes(); <-refreshesDone })

	dir := t.TempDir()
	amAddr, haveAM := startAlertmanager(t)
	config := "global:\n  evaluation_interval: 1s\nrule_files: [" + testRules(t, dir) + "]\n"
	if haveAM {
		config += "alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['" + amAddr + "']\n"
	}
	// A 15 s lookback instead of 5 min: remote-written series have no staleness
	// markers, and the pipeline-absent alert should not wait 5 minutes here.
	prom := startPrometheusWith(t, config, "--query.lookback-delta=15s")
	watch := watchAlerts(t, prom)

	env := map[string]string{
		"PGCONSISTENCY_DB_ENDPOINT":         "127.0.0.1:" + strconv.Itoa(srv.Port),
		"PGCONSISTENCY_DB_USER":             srv.User,
		"PGCONSISTENCY_DB_PASSWORD":         srv.Password,
		"PGCONSISTENCY_DB_NAME":             db,
		"PGCONSISTENCY_DB_TLS_INSECURE":     "true",
		"PGCONSISTENCY_COLLECTION_INTERVAL": "1s",
		"PGCONSISTENCY_REMOTE_WRITE_URL":    prom.url("/api/v1/write"),
		"PGCONSISTENCY_WAL_DIR":             filepath.Join(dir, "wal"),
		"PGCONSISTENCY_HEALTH_ENDPOINT":     "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t)),
		"PGCONSISTENCY_TELEMETRY_PORT":      strconv.Itoa(testkit.FreePort(t)),
	}
	collector := startCollector(t, "config/collector-remotewrite.yaml", env)
	dbSelector := fmt.Sprintf(`postgresql_database_name=%q`, db)
	require.Eventually(t, func() bool {
		s, err := prom.query("pgconsistency_up{"+dbSelector+"}", time.Time{})
		return err == nil && len(s) == 1 && s[0].value == 1
	}, 60*time.Second, 250*time.Millisecond, "pgconsistency_up never reached Prometheus")
	// A few evaluations of a healthy, clean database: nothing fires.
	time.Sleep(5 * time.Second)
	alerts, err := prom.alerts()
	require.NoError(t, err)
	require.Empty(t, alerts, "a clean, fresh, reachable database raises no alert")

	t.Run("new anomaly: pending, then firing", func(t *testing.T) {
		broke := time.Now()
		// The row is kept aside: the next subtest puts it back.
		_, err := conn.Exec(t.Context(), "CREATE TABLE public.e2e_lost_head AS SELECT * FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'",
			fixture.DatasetID(7))
		require.NoError(t, err)
		_, err = conn.Exec(t.Context(), "DELETE FROM public.dataset_references WHERE dataset_id = $1 AND block_ref_name = 'head'",
			fixture.DatasetID(7))
		require.NoError(t, err)
		_, err = conn.Exec(t.Context(), "CALL pgconsistency.refresh('dataset_head_ref_missing')")
		require.NoError(t, err)
		pending := watch.waitFor(t, "PgConsistencyNewAnomalies", "dataset_head_ref_missing", "pending", 30*time.Second)
		firing := watch.waitFor(t, "PgConsistencyNewAnomalies", "dataset_head_ref_missing", "firing", 30*time.Second)
		require.True(t, firing.After(pending))
		t.Logf("PgConsistencyNewAnomalies{invariant=dataset_head_ref_missing}: pending %s and firing %s after the breaking refresh",
			pending.Sub(broke).Round(100*time.Millisecond), firing.Sub(broke).Round(100*time.Millisecond))
		a, ok, err := prom.active("PgConsistencyNewAnomalies", "dataset_head_ref_missing")
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, "team-a", a.Labels["owner"], "the owner label: the invariant's owner")
		assert.Equal(t, teamARunbook, a.Annotations["runbook_url"], "the runbook: the invariant's")
		if haveAM {
			require.Eventually(t, func() bool { return alertmanagerHas(amAddr, "PgConsistencyNewAnomalies") },
				30*time.Second, 250*time.Millisecond, "the alert did not reach Alertmanager")
			t.Logf("PgConsistencyNewAnomalies reached Alertmanager at %s", amAddr)
			require.Eventually(t, func() bool {
				return slices.Equal(alertmanagerReceivers(amAddr, "PgConsistencyNewAnomalies", "dataset_head_ref_missing"), []string{"team-a-pager"})
			}, 30*time.Second, 250*time.Millisecond, "team-a's critical alert is routed to team-a-pager: %v",
				alertmanagerReceivers(amAddr, "PgConsistencyNewAnomalies", "dataset_head_ref_missing"))
		}
	})

	// PgConsistencyAnomaliesPersist (pgconsistency_anomalies > 0, its "for"
	// shortened) follows the anomaly count: it resolves when the anomaly is
	// fixed (the next refresh no longer finds it) and when it is
	// acknowledged (acknowledge_all takes it out of the count at once).
	t.Run("anomalies fixed or acknowledged: alerts resolve", func(t *testing.T) {
		_, err := conn.Exec(t.Context(), "DELETE FROM public.dataset_statistics WHERE dataset_id = $1", fixture.DatasetID(9))
		require.NoError(t, err)
		_, err = conn.Exec(t.Context(), "CALL pgconsistency.refresh('dataset_statistics_missing', force => true)")
		require.NoError(t, err)
		for _, inv := range []string{"dataset_head_ref_missing", "dataset_statistics_missing"} {
			watch.waitFor(t, "PgConsistencyAnomaliesPersist", inv, "firing", 30*time.Second)
		}
		a, ok, err := prom.active("PgConsistencyNewAnomalies", "dataset_statistics_missing")
		require.NoError(t, err)
		if assert.True(t, ok, "PgConsistencyNewAnomalies{dataset_statistics_missing}") {
			assert.Equal(t, "team-b", a.Labels["owner"])
			assert.Equal(t, "warning", a.Labels["severity"])
			assert.Equal(t, "https://github.com/pgconsistency/pgconsistency/blob/main/docs/runbook.md#pgconsistencynewanomalies",
				a.Annotations["runbook_url"], "no runbook of its own: the generic one")
		}
		if haveAM {
			require.Eventually(t, func() bool {
				return slices.Equal(alertmanagerReceivers(amAddr, "PgConsistencyNewAnomalies", "dataset_statistics_missing"), []string{"team-b-chat"})
			}, 30*time.Second, 250*time.Millisecond, "team-b's warning is routed to team-b-chat")
		}

		resolved := func(inv string) {
			t.Helper()
			require.Eventually(t, func() bool {
				_, ok, err := prom.active("PgConsistencyAnomaliesPersist", inv)
				return err == nil && !ok
			}, 30*time.Second, 250*time.Millisecond, "PgConsistencyAnomaliesPersist{%s} did not resolve", inv)
		}
		fixed := time.Now()
		_, err = conn.Exec(t.Context(), "INSERT INTO public.dataset_references SELECT * FROM public.e2e_lost_head")
		require.NoError(t, err)
		_, err = conn.Exec(t.Context(), "CALL pgconsistency.refresh('dataset_head_ref_missing', force => true)")
		require.NoError(t, err)
		resolved("dataset_head_ref_missing")
		t.Logf("PgConsistencyAnomaliesPersist{dataset_head_ref_missing} resolved %s after the fix and its refresh",
			time.Since(fixed).Round(100*time.Millisecond))
		_, still, err := prom.active("PgConsistencyAnomaliesPersist", "dataset_statistics_missing")
		require.NoError(t, err)
		require.True(t, still, "the other invariant's alert is still active")

		acknowledged := time.Now()
		_, err = conn.Exec(t.Context(), "SELECT pgconsistency.acknowledge_all('dataset_statistics_missing', 'e2e: known leftovers')")
		require.NoError(t, err)
		resolved("dataset_statistics_missing")
		t.Logf("PgConsistencyAnomaliesPersist{dataset_statistics_missing} resolved %s after acknowledge_all, with no refresh",
			time.Since(acknowledged).Round(100*time.Millisecond))
	})

	t.Run("refreshes stop: snapshots go stale", func(t *testing.T) {
		stopRefreshes()
		<-refreshesDone
		stopped := time.Now()
		firing := watch.waitFor(t, "PgConsistencySnapshotStale", "*", "firing", 90*time.Second)
		t.Logf("PgConsistencySnapshotStale firing %s after the refreshes stopped (3 periods of 10 s, for 3s)",
			firing.Sub(stopped).Round(100*time.Millisecond))
	})

	t.Run("database stops: database down", func(t *testing.T) {
		srv.Stop(t)
		stopped := time.Now()
		firing := watch.waitFor(t, "PgConsistencyDatabaseDown", "", "firing", 60*time.Second)
		t.Logf("PgConsistencyDatabaseDown firing %s after the database stopped", firing.Sub(stopped).Round(100*time.Millisecond))
	})

	t.Run("collector stops: pipeline absent", func(t *testing.T) {
		_, early := watch.seen("PgConsistencyPipelineAbsent", "", "pending")
		require.False(t, early, "the pipeline-absent alert must not even be pending while the collector runs")
		collector.stop(t)
		stopped := time.Now()
		firing := watch.waitFor(t, "PgConsistencyPipelineAbsent", "", "firing", 60*time.Second)
		t.Logf("PgConsistencyPipelineAbsent firing %s after the collector stopped (15 s lookback, for 3s)",
			firing.Sub(stopped).Round(100*time.Millisecond))
	})

	t.Run("dashboard and Grafana alert queries are valid PromQL", func(t *testing.T) {
		exprs := grafanaExprs(t)
		require.NotEmpty(t, exprs)
		for _, e := range exprs {
			q := strings.ReplaceAll(e, "$database", ".*")
			_, err := prom.query(q, time.Time{})
			require.NoError(t, err, "expression from config/grafana: %s", e)
		}
		t.Logf("%d expressions from config/grafana evaluated by Prometheus without error", len(exprs))
	})
}

// grafanaExprs returns every PromQL expression of the Grafana dashboard and
// alert provisioning in config/grafana.
func grafanaExprs(t *testing.T) []string {
	t.Helper()
	var exprs []string
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				if s, ok := x.(string); ok && k == "expr" && strings.Contains(s, "pgconsistency") {
					exprs = append(exprs, s)
					continue
				}
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	files, err := filepath.Glob(fixture.Path("config/grafana/*/*.json"))
	require.NoError(t, err)
	more, err := filepath.Glob(fixture.Path("config/grafana/provisioning/alerting/*.yaml"))
	require.NoError(t, err)
	for _, f := range append(files, more...) {
		data, err := os.ReadFile(f)
		require.NoError(t, err)
		var doc any
		if strings.HasSuffix(f, ".json") {
			require.NoError(t, json.Unmarshal(data, &doc), f)
		} else {
			require.NoError(t, yaml.Unmarshal(data, &doc), f)
		}
		walk(doc)
	}
	slices.Sort(exprs)
	return slices.Compact(exprs)
}
