package configtest_test

// Offline checks of the Grafana files in config/grafana/ (there is no Grafana
// to load them into here): they parse, the dashboard and the alert rules use
// the provisioned datasource, the dashboard filters by its database variable,
// and the Grafana alert rules are the alerts of config/prometheus-rules.yaml.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"text/template"
	"time"

	yaml "go.yaml.in/yaml/v3"
)

const (
	datasourceUID      = "pgconsistency-prometheus"
	exprDatasourceUID  = "__expr__"
	grafanaDir         = "grafana"
	dashboardFile      = "grafana/dashboards/pgconsistency.json"
	datasourceFile     = "grafana/provisioning/datasources/pgconsistency.yaml"
	providerFile       = "grafana/provisioning/dashboards/pgconsistency.yaml"
	alertingFile       = "grafana/provisioning/alerting/pgconsistency.yaml"
	prometheusRuleFile = "prometheus-rules.yaml"
	providerPath       = "/var/lib/grafana/dashboards/pgconsistency"
	databaseVariable   = "database"
	databaseLabel      = "postgresql_database_name"
)

// readYAML decodes one YAML document; strict rejects fields v does not know.
func readYAML(t *testing.T, path string, v any, strict bool) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(strict)
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func readJSON(t *testing.T, path string, v any) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func normalizeSpace(s string) string { return strings.Join(strings.Fields(s), " ") }

// TestGrafanaFilesParse parses every JSON and YAML file under config/grafana/.
func TestGrafanaFilesParse(t *testing.T) {
	var n int
	err := filepath.WalkDir(grafanaDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		var v any
		switch filepath.Ext(path) {
		case ".json":
			readJSON(t, path, &v)
		case ".yaml", ".yml":
			readYAML(t, path, &v, false)
		default:
			return nil
		}
		if v == nil {
			t.Errorf("%s: empty", path)
		}
		n++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n < 4 {
		t.Errorf("found %d JSON/YAML files under %s, want at least 4", n, grafanaDir)
	}
}

func TestGrafanaDatasource(t *testing.T) {
	var f struct {
		APIVersion  int `yaml:"apiVersion"`
		Datasources []struct {
			Name      string         `yaml:"name"`
			UID       string         `yaml:"uid"`
			Type      string         `yaml:"type"`
			Access    string         `yaml:"access"`
			URL       string         `yaml:"url"`
			IsDefault bool           `yaml:"isDefault"`
			Editable  bool           `yaml:"editable"`
			JSONData  map[string]any `yaml:"jsonData"`
		} `yaml:"datasources"`
	}
	readYAML(t, datasourceFile, &f, true)
	if f.APIVersion != 1 {
		t.Errorf("apiVersion = %d, want 1", f.APIVersion)
	}
	if len(f.Datasources) != 1 {
		t.Fatalf("%d datasources, want 1", len(f.Datasources))
	}
	ds := f.Datasources[0]
	if ds.UID != datasourceUID || ds.Type != "prometheus" || ds.Name == "" || !strings.HasPrefix(ds.URL, "http") {
		t.Errorf("datasource = %+v, want a named prometheus datasource with uid %q and an http(s) url", ds, datasourceUID)
	}
}

func TestGrafanaDashboardProvider(t *testing.T) {
	var f struct {
		APIVersion int `yaml:"apiVersion"`
		Providers  []struct {
			Name                  string `yaml:"name"`
			OrgID                 int    `yaml:"orgId"`
			Type                  string `yaml:"type"`
			Folder                string `yaml:"folder"`
			DisableDeletion       bool   `yaml:"disableDeletion"`
			AllowUIUpdates        bool   `yaml:"allowUiUpdates"`
			UpdateIntervalSeconds int    `yaml:"updateIntervalSeconds"`
			Options               struct {
				Path                      string `yaml:"path"`
				FoldersFromFilesStructure bool   `yaml:"foldersFromFilesStructure"`
			} `yaml:"options"`
		} `yaml:"providers"`
	}
	readYAML(t, providerFile, &f, true)
	if f.APIVersion != 1 || len(f.Providers) != 1 {
		t.Fatalf("apiVersion %d, %d providers; want 1, 1", f.APIVersion, len(f.Providers))
	}
	p := f.Providers[0]
	if p.Type != "file" || p.Options.Path != providerPath || p.Name == "" {
		t.Errorf("provider = %+v, want a named file provider with path %q", p, providerPath)
	}
}

type datasourceRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type dashboardPanel struct {
	ID         int             `json:"id"`
	Type       string          `json:"type"`
	Title      string          `json:"title"`
	Datasource *datasourceRef  `json:"datasource"`
	GridPos    *gridPos        `json:"gridPos"`
	Targets    []dashboardExpr `json:"targets"`
	Panels     []dashboardPanel
}

type gridPos struct{ H, W, X, Y int }

type dashboardExpr struct {
	RefID      string         `json:"refId"`
	Name       string         `json:"name"` // annotations
	Datasource *datasourceRef `json:"datasource"`
	Expr       string         `json:"expr"`
}

type dashboard struct {
	UID           string           `json:"uid"`
	Title         string           `json:"title"`
	SchemaVersion int              `json:"schemaVersion"`
	Panels        []dashboardPanel `json:"panels"`
	Templating    struct {
		List []struct {
			Name       string         `json:"name"`
			Type       string         `json:"type"`
			Datasource *datasourceRef `json:"datasource"`
			Definition string         `json:"definition"`
			Multi      bool           `json:"multi"`
			IncludeAll bool           `json:"includeAll"`
		} `json:"list"`
	} `json:"templating"`
	Annotations struct {
		List []dashboardExpr `json:"list"`
	} `json:"annotations"`
}

func readDashboard(t *testing.T) dashboard {
	t.Helper()
	var d dashboard
	readJSON(t, dashboardFile, &d)
	return d
}

// allPanels flattens rows.
func allPanels(ps []dashboardPanel) []dashboardPanel {
	var out []dashboardPanel
	for _, p := range ps {
		out = append(out, p)
		out = append(out, allPanels(p.Panels)...)
	}
	return out
}

// dashboardExprs returns every PromQL expression of the dashboard (panel
// targets and annotation queries), keyed by where it is.
func dashboardExprs(d dashboard) map[string]string {
	out := map[string]string{}
	for _, p := range allPanels(d.Panels) {
		for _, tg := range p.Targets {
			out[fmt.Sprintf("panel %d %q target %s", p.ID, p.Title, tg.RefID)] = tg.Expr
		}
	}
	for _, a := range d.Annotations.List {
		if a.Expr != "" {
			out[fmt.Sprintf("annotation %q", a.Name)] = a.Expr
		}
	}
	return out
}

var (
	// A template variable: $x, ${x}, ${x:fmt}, [[x]].
	templateVariableRE = regexp.MustCompile(`\$\{?(\w+)|\[\[(\w+)`)
	// A matcher on the database label.
	databaseMatcherRE = regexp.MustCompile(databaseLabel + `\s*(=~|!~|!=|=)\s*"([^"]*)"`)
	// A metric selector of ours: a pgconsistency_ metric or the recording rule,
	// with its {...} if any. Group 1 is what precedes it (a metric name does not
	// start inside another name).
	metricSelectorRE = regexp.MustCompile(`(^|[^\w:])((?:pgconsistency_|` + databaseLabel + `:)[\w:]*)\s*(\{[^}]*\})?`)
)

// checkDatabaseFilter reports what is wrong with how expr filters by the
// database variable: every selector must have postgresql_database_name=~"$database",
// and no other template variable may appear.
func checkDatabaseFilter(expr string) []string {
	var problems []string
	for _, m := range templateVariableRE.FindAllStringSubmatch(expr, -1) {
		if name := m[1] + m[2]; name != databaseVariable {
			problems = append(problems, fmt.Sprintf("template variable %q (only $%s is allowed)", m[0], databaseVariable))
		}
	}
	for _, m := range databaseMatcherRE.FindAllStringSubmatch(expr, -1) {
		if m[1] != "=~" || m[2] != "$"+databaseVariable {
			problems = append(problems, fmt.Sprintf("matcher %s, want %s=~\"$%s\"", m[0], databaseLabel, databaseVariable))
		}
	}
	selectors := metricSelectorRE.FindAllStringSubmatch(expr, -1)
	if len(selectors) == 0 {
		problems = append(problems, "no pgconsistency metric")
	}
	for _, m := range selectors {
		if !strings.Contains(m[3], databaseLabel+`=~"$`+databaseVariable+`"`) {
			problems = append(problems, fmt.Sprintf("selector %s does not filter by $%s", strings.TrimSpace(m[2]+m[3]), databaseVariable))
		}
	}
	return problems
}

func TestCheckDatabaseFilter(t *testing.T) {
	for expr, ok := range map[string]bool{
		`pgconsistency_up{postgresql_database_name=~"$database"}`:                                                             true,
		`sum by (postgresql_database_name) (pgconsistency_anomalies{postgresql_database_name=~"$database", severity="high"})`: true,
		`postgresql_database_name:pgconsistency_invariants_clean:ratio{postgresql_database_name=~"$database"}`:                true,
		`pgconsistency_up`: false,
		`postgresql_database_name:pgconsistency_invariants_clean:ratio`:                                                 false,
		`pgconsistency_up{postgresql_database_name="$database"}`:                                                        false,
		`pgconsistency_up{postgresql_database_name=~"app"}`:                                                             false,
		`rate(pgconsistency_up{postgresql_database_name=~"$database"}[$__rate_interval])`:                               false,
		`pgconsistency_up{postgresql_database_name=~"$database"} / pgconsistency_refresh_period_seconds{invariant="x"}`: false,
		`up`: false,
	} {
		if got := checkDatabaseFilter(expr); (len(got) == 0) != ok {
			t.Errorf("checkDatabaseFilter(%s) = %q, want ok=%v", expr, got, ok)
		}
	}
}

func TestGrafanaDashboard(t *testing.T) {
	d := readDashboard(t)
	if d.UID != "pgconsistency" || d.Title == "" || d.SchemaVersion < 36 {
		t.Errorf("uid %q, title %q, schemaVersion %d; want uid pgconsistency, a title, schemaVersion >= 36", d.UID, d.Title, d.SchemaVersion)
	}

	var found bool
	for _, v := range d.Templating.List {
		if v.Name != databaseVariable {
			continue
		}
		found = true
		if v.Type != "query" || v.Datasource == nil || v.Datasource.UID != datasourceUID ||
			!strings.Contains(v.Definition, "pgconsistency_up") || !strings.Contains(v.Definition, databaseLabel) ||
			!v.Multi || !v.IncludeAll {
			t.Errorf("variable %s = %+v, want a multi-value query variable with All over %s of pgconsistency_up from datasource %s",
				databaseVariable, v, databaseLabel, datasourceUID)
		}
	}
	if !found {
		t.Errorf("no template variable %q", databaseVariable)
	}

	panels := allPanels(d.Panels)
	if len(panels) < 8 {
		t.Errorf("%d panels, want at least 8", len(panels))
	}
	ids := map[int]string{}
	for _, p := range panels {
		name := fmt.Sprintf("panel %d %q", p.ID, p.Title)
		if p.ID <= 0 {
			t.Errorf("%s: id must be positive", name)
		} else if other, dup := ids[p.ID]; dup {
			t.Errorf("%s: id also used by %q", name, other)
		}
		ids[p.ID] = p.Title
		if p.Title == "" || p.Type == "" {
			t.Errorf("%s: no title or type", name)
		}
		if g := p.GridPos; g == nil || g.W <= 0 || g.H <= 0 || g.X < 0 || g.Y < 0 || g.X+g.W > 24 {
			t.Errorf("%s: gridPos %+v, want one inside the 24 columns", name, g)
		}
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != datasourceUID {
			t.Errorf("%s: datasource %+v, want uid %s", name, p.Datasource, datasourceUID)
		}
		if len(p.Targets) == 0 {
			t.Errorf("%s: no target", name)
		}
		refIDs := map[string]bool{}
		for _, tg := range p.Targets {
			if strings.TrimSpace(tg.Expr) == "" {
				t.Errorf("%s target %s: empty expr", name, tg.RefID)
			}
			if tg.Datasource == nil || tg.Datasource.UID != datasourceUID {
				t.Errorf("%s target %s: datasource %+v, want uid %s", name, tg.RefID, tg.Datasource, datasourceUID)
			}
			if tg.RefID == "" || refIDs[tg.RefID] {
				t.Errorf("%s: missing or repeated refId %q", name, tg.RefID)
			}
			refIDs[tg.RefID] = true
		}
	}

	for _, a := range d.Annotations.List {
		if a.Expr != "" && (a.Datasource == nil || a.Datasource.UID != datasourceUID) {
			t.Errorf("annotation %q: datasource %+v, want uid %s", a.Name, a.Datasource, datasourceUID)
		}
	}
	for where, expr := range dashboardExprs(d) {
		for _, p := range checkDatabaseFilter(expr) {
			t.Errorf("%s: %s\n\t%s", where, p, expr)
		}
	}
}

// TestGrafanaDashboardPromQL parses the dashboard's expressions, $database
// replaced by a regexp, with promtool when it is installed.
func TestGrafanaDashboardPromQL(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not installed")
	}
	exprs := dashboardExprs(readDashboard(t))
	type rule struct {
		Record string `yaml:"record"`
		Expr   string `yaml:"expr"`
	}
	var rules []rule
	var names strings.Builder
	for _, where := range slices.Sorted(maps.Keys(exprs)) {
		rules = append(rules, rule{
			Record: fmt.Sprintf("dashboard_expr_%d", len(rules)),
			Expr:   strings.ReplaceAll(exprs[where], "$"+databaseVariable, ".+"),
		})
		fmt.Fprintf(&names, "%s: %s\n", rules[len(rules)-1].Record, where)
	}
	data, err := yaml.Marshal(map[string]any{"groups": []any{map[string]any{"name": "dashboard", "rules": rules}}})
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "dashboard-rules.yaml")
	if err := os.WriteFile(file, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(promtool, "check", "rules", file).CombinedOutput(); err != nil {
		t.Errorf("promtool check rules: %v\n%s\n%s\n%s", err, out, data, names.String())
	}
}

type prometheusRule struct {
	Alert       string            `yaml:"alert"`
	Record      string            `yaml:"record"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

func prometheusAlerts(t *testing.T) map[string]prometheusRule {
	t.Helper()
	var f struct {
		Groups []struct {
			Name  string           `yaml:"name"`
			Rules []prometheusRule `yaml:"rules"`
		} `yaml:"groups"`
	}
	readYAML(t, prometheusRuleFile, &f, false)
	alerts := map[string]prometheusRule{}
	for _, g := range f.Groups {
		for _, r := range g.Rules {
			if r.Alert != "" {
				alerts[r.Alert] = r
			}
		}
	}
	if len(alerts) == 0 {
		t.Fatalf("%s: no alerts", prometheusRuleFile)
	}
	return alerts
}

type grafanaQuery struct {
	RefID             string `yaml:"refId"`
	RelativeTimeRange struct {
		From int `yaml:"from"`
		To   int `yaml:"to"`
	} `yaml:"relativeTimeRange"`
	DatasourceUID string         `yaml:"datasourceUid"`
	Model         map[string]any `yaml:"model"`
}

type grafanaRule struct {
	UID          string            `yaml:"uid"`
	Title        string            `yaml:"title"`
	Condition    string            `yaml:"condition"`
	Data         []grafanaQuery    `yaml:"data"`
	NoDataState  string            `yaml:"noDataState"`
	ExecErrState string            `yaml:"execErrState"`
	For          string            `yaml:"for"`
	Labels       map[string]string `yaml:"labels"`
	Annotations  map[string]string `yaml:"annotations"`
	IsPaused     bool              `yaml:"isPaused"`
}

type grafanaAlerting struct {
	APIVersion int `yaml:"apiVersion"`
	Groups     []struct {
		OrgID    int           `yaml:"orgId"`
		Name     string        `yaml:"name"`
		Folder   string        `yaml:"folder"`
		Interval string        `yaml:"interval"`
		Rules    []grafanaRule `yaml:"rules"`
	} `yaml:"groups"`
}

var durationRE = regexp.MustCompile(`^(?:\d+(?:ms|s|m|h|d|w|y))+$`)
var durationPartRE = regexp.MustCompile(`(\d+)(ms|s|m|h|d|w|y)`)

// parseDuration parses a Prometheus/Grafana duration such as 1m, 24h, 7d, 1h30m.
func parseDuration(s string) (time.Duration, error) {
	if !durationRE.MatchString(s) {
		return 0, fmt.Errorf("bad duration %q", s)
	}
	units := map[string]time.Duration{"ms": time.Millisecond, "s": time.Second, "m": time.Minute, "h": time.Hour,
		"d": 24 * time.Hour, "w": 7 * 24 * time.Hour, "y": 365 * 24 * time.Hour}
	var d time.Duration
	for _, m := range durationPartRE.FindAllStringSubmatch(s, -1) {
		n, err := strconv.Atoi(m[1])
		if err != nil {
			return 0, err
		}
		d += time.Duration(n) * units[m[2]]
	}
	return d, nil
}

// templateFuncs stands in for the functions of Grafana's (and Prometheus')
// alert templates, so that text/template can parse the annotations.
var templateFuncs = template.FuncMap{}

func init() {
	for _, name := range []string{"humanize", "humanize1024", "humanizeDuration", "humanizePercentage",
		"humanizeTimestamp", "title", "toUpper", "toLower", "match", "reReplaceAll", "graphLink", "tableLink",
		"args", "externalURL", "pathPrefix", "safeHtml", "stripPort", "stripDomain", "toTime", "parseDuration"} {
		templateFuncs[name] = func(...any) string { return "" }
	}
}

func TestGrafanaAlertRules(t *testing.T) {
	prom := prometheusAlerts(t)
	var f grafanaAlerting
	readYAML(t, alertingFile, &f, true)
	if f.APIVersion != 1 {
		t.Errorf("apiVersion = %d, want 1", f.APIVersion)
	}

	uids := map[string]bool{}
	var titles []string
	for _, g := range f.Groups {
		if g.OrgID != 1 || g.Name == "" || g.Folder != "pgconsistency" {
			t.Errorf("group %q: orgId %d, folder %q; want orgId 1, folder pgconsistency", g.Name, g.OrgID, g.Folder)
		}
		if d, err := parseDuration(g.Interval); err != nil || d <= 0 {
			t.Errorf("group %q: interval %q: %v", g.Name, g.Interval, err)
		}
		for _, r := range g.Rules {
			titles = append(titles, r.Title)
			if !regexp.MustCompile(`^[a-zA-Z0-9_-]{1,40}$`).MatchString(r.UID) || uids[r.UID] {
				t.Errorf("rule %q: uid %q missing, invalid or repeated", r.Title, r.UID)
			}
			uids[r.UID] = true
			p, ok := prom[r.Title]
			if !ok {
				t.Errorf("rule %q: no such alert in %s", r.Title, prometheusRuleFile)
				continue
			}
			checkGrafanaRule(t, r, p)
		}
	}
	slices.Sort(titles)
	if want := slices.Sorted(maps.Keys(prom)); !slices.Equal(titles, want) {
		t.Errorf("Grafana alert rules %q, want the alerts of %s: %q", titles, prometheusRuleFile, want)
	}
}

func checkGrafanaRule(t *testing.T, r grafanaRule, p prometheusRule) {
	name := "rule " + r.Title

	if !slices.Contains([]string{"NoData", "Alerting", "OK"}, r.NoDataState) {
		t.Errorf("%s: noDataState %q, want NoData, Alerting or OK", name, r.NoDataState)
	}
	if !slices.Contains([]string{"Error", "Alerting", "OK"}, r.ExecErrState) {
		t.Errorf("%s: execErrState %q, want Error, Alerting or OK", name, r.ExecErrState)
	}
	if r.IsPaused {
		t.Errorf("%s: paused", name)
	}

	gFor, err := parseDuration(r.For)
	if err != nil {
		t.Errorf("%s: for: %v", name, err)
	}
	pFor := time.Duration(0)
	if p.For != "" {
		if pFor, err = parseDuration(p.For); err != nil {
			t.Errorf("%s: Prometheus for: %v", name, err)
		}
	}
	if gFor != pFor {
		t.Errorf("%s: for %q, Prometheus has %q", name, r.For, p.For)
	}

	if !maps.Equal(r.Labels, p.Labels) {
		t.Errorf("%s: labels %v, Prometheus has %v", name, r.Labels, p.Labels)
	}

	// The data: query A against the datasource, expressions on __expr__.
	refIDs := map[string]grafanaQuery{}
	for _, q := range r.Data {
		if q.RefID == "" || refIDs[q.RefID].RefID != "" {
			t.Errorf("%s: missing or repeated refId %q", name, q.RefID)
		}
		refIDs[q.RefID] = q
		if ref, _ := q.Model["refId"].(string); ref != q.RefID {
			t.Errorf("%s %s: model.refId %q", name, q.RefID, ref)
		}
		ds, _ := q.Model["datasource"].(map[string]any)
		if q.DatasourceUID == exprDatasourceUID {
			if ds["uid"] != exprDatasourceUID {
				t.Errorf("%s %s: model.datasource %v, want uid %s", name, q.RefID, ds, exprDatasourceUID)
			}
			if typ, _ := q.Model["type"].(string); !slices.Contains([]string{"reduce", "math", "threshold", "resample"}, typ) {
				t.Errorf("%s %s: expression type %q", name, q.RefID, typ)
			}
			continue
		}
		if q.DatasourceUID != datasourceUID || ds["uid"] != datasourceUID {
			t.Errorf("%s %s: datasourceUid %q, model.datasource %v; want %s", name, q.RefID, q.DatasourceUID, ds, datasourceUID)
		}
		if q.Model["instant"] != true || q.Model["range"] == true {
			t.Errorf("%s %s: not an instant query", name, q.RefID)
		}
	}
	// Expressions refer to existing refIds.
	for _, q := range r.Data {
		if q.DatasourceUID != exprDatasourceUID {
			continue
		}
		expression, _ := q.Model["expression"].(string)
		refs := regexp.MustCompile(`\$\{?(\w+)`).FindAllStringSubmatch(expression, -1)
		if q.Model["type"] != "math" {
			refs = [][]string{{expression, expression}}
		}
		if len(refs) == 0 {
			t.Errorf("%s %s: expression %q refers to no query", name, q.RefID, expression)
		}
		for _, ref := range refs {
			if _, ok := refIDs[ref[1]]; !ok || ref[1] == q.RefID {
				t.Errorf("%s %s: expression %q refers to %q, not another refId", name, q.RefID, expression, ref[1])
			}
		}
	}
	if _, ok := refIDs[r.Condition]; !ok {
		t.Errorf("%s: condition %q is not one of its refIds", name, r.Condition)
	}
	a, ok := refIDs["A"]
	if !ok || a.DatasourceUID != datasourceUID {
		t.Errorf("%s: no query A against %s", name, datasourceUID)
	} else if expr, _ := a.Model["expr"].(string); normalizeSpace(expr) != normalizeSpace(p.Expr) {
		t.Errorf("%s: expr of A\n\t%s\nPrometheus has\n\t%s", name, normalizeSpace(expr), normalizeSpace(p.Expr))
	}

	// Annotations: the same keys and runbook, Grafana's template variables.
	if got, want := slices.Sorted(maps.Keys(r.Annotations)), slices.Sorted(maps.Keys(p.Annotations)); !slices.Equal(got, want) {
		t.Errorf("%s: annotations %q, Prometheus has %q", name, got, want)
	}
	if r.Annotations["runbook_url"] == "" || r.Annotations["runbook_url"] != p.Annotations["runbook_url"] {
		t.Errorf("%s: runbook_url %q, Prometheus has %q", name, r.Annotations["runbook_url"], p.Annotations["runbook_url"])
	}
	for key, text := range r.Annotations {
		if strings.TrimSpace(text) == "" {
			t.Errorf("%s: annotation %s is empty", name, key)
		}
		// Grafana's $value is a string of every query's labels and values, not
		// the number Prometheus' $value is: use $values.<refId>.Value.
		if regexp.MustCompile(`\$value\b`).MatchString(text) {
			t.Errorf("%s: annotation %s uses $value; use $values.<refId>.Value", name, key)
		}
		for _, m := range regexp.MustCompile(`\$values\.(\w+)`).FindAllStringSubmatch(text, -1) {
			if _, ok := refIDs[m[1]]; !ok {
				t.Errorf("%s: annotation %s uses %s: no such refId", name, key, m[0])
			}
		}
		// Grafana defines $labels, $values and $value before the text.
		const defs = `{{- $labels := .Labels -}}{{- $values := .Values -}}{{- $value := .Value -}}`
		if _, err := template.New(key).Funcs(templateFuncs).Parse(defs + text); err != nil {
			t.Errorf("%s: annotation %s: %v", name, key, err)
		}
	}
}
