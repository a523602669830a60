package walstream

import (
	"errors"
	"strings"
	"testing"
)

func TestAction(t *testing.T) {
	for change, want := range map[string]string{
		`{"action":"C"}`: "C",
		`{"action":"I","schema":"public","table":"t","columns":[{"name":"id","value":1}]}`: "I",
		` { "action" : "D", "identity": [] }`:                                              "D",
		`{"schema":"public","action":"U"}`:                                                 "U",
		`{"schema":"public"}`:                                                              "",
		`not json`:                                                                         "",
		`{"action":1}`:                                                                     "",
	} {
		if got := action([]byte(change)); got != want {
			t.Errorf("action(%s) = %q, want %q", change, got, want)
		}
	}
}

func TestQuote(t *testing.T) {
	if got, want := quote(`public.a\,b,public.it's`), `'public.a\,b,public.it''s'`; got != want {
		t.Errorf("quote = %s, want %s", got, want)
	}
}

func TestConnectAdvice(t *testing.T) {
	for msg, want := range map[string]string{
		`FATAL: must be superuser or replication role to start walsender (SQLSTATE 42501)`:   "ALTER ROLE <role> REPLICATION",
		`server error: ERROR: unsupported startup parameter: replication (SQLSTATE 08P01)`:   "point refresh::wal_stream::endpoint at the PostgreSQL server itself",
		`FATAL: no pg_hba.conf entry for host "10.0.0.5", user "pgc_stream", database "app"`: "add a pg_hba.conf line for the stream's role to this database",
		`dial tcp 127.0.0.1:5432: connect: connection refused`:                               "",
	} {
		got := connectAdvice(errors.New(msg))
		if want == "" && got != "" || !strings.Contains(got, want) {
			t.Errorf("connectAdvice(%q) = %q, want it to say %q", msg, got, want)
		}
	}
}
