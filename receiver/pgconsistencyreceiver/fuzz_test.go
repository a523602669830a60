package pgconsistencyreceiver

import (
	"strings"
	"testing"

	"go.opentelemetry.io/collector/config/confignet"
)

// FuzzSchema: whatever "schema" holds, the configuration is either valid
// (unset or "pgconsistency", the only schema the SQL installs into) or
// refused with an error naming the key (the queries name the schema as a
// constant: no setting reaches them).
func FuzzSchema(f *testing.F) {
	for _, seed := range []string{"pgconsistency", "", `pg"consistency`, `x"; DROP TABLE public.dataset_entries; --`, "with space", "\x00", "Ünïcode"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		cfg := createDefaultConfig()
		cfg.Username, cfg.Database = "otel", "app"
		cfg.Schema = s
		err := cfg.Validate()
		switch {
		case s == "" || s == "pgconsistency":
			if err != nil {
				t.Fatalf("schema %q refused: %v", s, err)
			}
		case err == nil || !strings.Contains(err.Error(), `"schema"`):
			t.Fatalf("schema %q: want an error naming the key, got %v", s, err)
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
