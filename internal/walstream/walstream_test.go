package walstream

import "testing"

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
