package pgconsistencyreceiver

import (
	"strings"
	"testing"

	"go.opentelemetry.io/collector/config/confignet"
)

// FuzzStatusQuery: whatever the configured schema, it ends up inside one
// quoted identifier; nothing of it can become SQL.
func FuzzStatusQuery(f *testing.F) {
	for _, seed := range []string{"pgconsistency", `pg"consistency`, `x"; DROP TABLE public.dataset_entries; --`, "with space", "", "\x00", `""`, "Ünïcode"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, schema string) {
		q := statusQuery(schema)
		clean := strings.ReplaceAll(schema, "\x00", "") // pgx drops NUL bytes, which PostgreSQL refuses anyway
		want := `"` + strings.ReplaceAll(clean, `"`, `""`) + `"."status"`
		if !strings.Contains(q, " FROM "+want+" WHERE enabled") {
			t.Fatalf("schema %q: query %q does not quote it as %s", schema, q, want)
		}
		// Outside the identifier, the query is the same for every schema.
		if got := strings.Replace(q, want, `"S"."status"`, 1); got != statusQuery("S") {
			t.Fatalf("schema %q changed the query outside its identifier: %q", schema, got)
		}
	})
}

// FuzzEndpoint: endpoint parsing never panics, and what it accepts is a
// usable host and port.
func FuzzEndpoint(f *testing.F) {
	for _, seed := range []string{"localhost:5432", "[::1]:5432", "/var/run/postgresql:5432", ":5432", "db:", "db:70000", "a:b:c", "[::1", "host:0"} {
		f.Add(seed, false)
		f.Add(seed, true)
	}
	f.Fuzz(func(t *testing.T, endpoint string, unix bool) {
		cfg := createDefaultConfig()
		cfg.Endpoint = endpoint
		if unix {
			cfg.Transport = confignet.TransportTypeUnix
		}
		host, port, err := cfg.hostPort()
		if err != nil {
			if !strings.Contains(err.Error(), `"endpoint"`) {
				t.Fatalf("endpoint %q: the error does not name the key: %v", endpoint, err)
			}
			return
		}
		if host == "" || port == 0 {
			t.Fatalf("endpoint %q accepted as host %q port %d", endpoint, host, port)
		}
		if unix && !strings.HasPrefix(host, "/") {
			t.Fatalf("unix endpoint %q accepted with a relative directory %q", endpoint, host)
		}
	})
}
