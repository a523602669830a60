package testkit

import (
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strconv"
	"testing"
)

func TestParseExposition(t *testing.T) {
	page := `# HELP pgconsistency_anomalies Anomalies.
# TYPE pgconsistency_anomalies gauge
pgconsistency_anomalies{invariant="dataset_seed_missing",postgresql_database_name="app"} 3
pgconsistency_anomalies{invariant="a,b",note="say \"hi\"\nback\\slash"} 1.5 1700000000000

otelcol_process_uptime 12
up{} 1
`
	got, err := ParseExposition(page)
	if err != nil {
		t.Fatal(err)
	}
	want := []Sample{
		{"pgconsistency_anomalies", map[string]string{"invariant": "dataset_seed_missing", "postgresql_database_name": "app"}, 3},
		{"pgconsistency_anomalies", map[string]string{"invariant": "a,b", "note": "say \"hi\"\nback\\slash"}, 1.5},
		{"otelcol_process_uptime", map[string]string{}, 12},
		{"up", map[string]string{}, 1},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got  %v\nwant %v", got, want)
	}
	if n := Total(got, "pgconsistency_anomalies"); n != 4.5 {
		t.Errorf("Total = %v, want 4.5", n)
	}
	for _, bad := range []string{"novalue", `m{a="1"}`, `m{a="1} 2`, `m{a=1} 2`, "m notanumber"} {
		if _, err := ParseExposition(bad); err == nil {
			t.Errorf("ParseExposition(%q): no error", bad)
		}
	}
}

func TestScrapeAndFreePort(t *testing.T) {
	port := FreePort(t)
	l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		t.Fatalf("FreePort gave %d, not free: %v", port, err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte("m{k=\"v\"} 7\n"))
	}))
	srv.Listener = l
	srv.Start()
	defer srv.Close()
	got, err := Scrape(srv.URL + "/metrics")
	if err != nil || len(got) != 1 || got[0].Value != 7 || got[0].Labels["k"] != "v" {
		t.Errorf("Scrape = %v, %v", got, err)
	}
	if _, err := Scrape(srv.URL + "/other"); err == nil {
		t.Error("Scrape of a 404 page: no error")
	}
}
