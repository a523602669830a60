//go:build e2e

package e2e

import (
	"os"
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

// TestTLSVerifiedByDefault: the collector built from builder-config.yaml
// with the shipped config/collector-prometheus.yaml, against PostgreSQL
// servers with ssl = on and certificates of a test CA. The shipped
// configuration verifies the server: with the CA as
// PGCONSISTENCY_DB_TLS_CA_FILE the gauges are exact; without it, or with a
// certificate for another host, or against a server without TLS, nothing is
// read and the collector's log names the setting to change.
func TestTLSVerifiedByDefault(t *testing.T) {
	t.Parallel()
	ca := pgtest.NewTestCA(t, "pgconsistency e2e CA")
	cert, key := ca.IssueServerCert(t, "IP:127.0.0.1,DNS:localhost")
	srv := pgtest.Start(t, pgtest.WithTLS(cert, key))
	db := fixture.NewDatabase(t, srv, fixture.Invariants...)
	srv.Psql(t, db, "-c", "CALL pgconsistency.refresh()")

	env := func(s *pgtest.Server, extra map[string]string) map[string]string {
		e := map[string]string{
			"PGCONSISTENCY_DB_ENDPOINT":         "127.0.0.1:" + strconv.Itoa(s.Port),
			"PGCONSISTENCY_DB_USER":             s.User,
			"PGCONSISTENCY_DB_PASSWORD":         s.Password,
			"PGCONSISTENCY_DB_NAME":             db,
			"PGCONSISTENCY_COLLECTION_INTERVAL": collectionInterval.String(),
			"PGCONSISTENCY_PROMETHEUS_ENDPOINT": "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t)),
			"PGCONSISTENCY_HEALTH_ENDPOINT":     "127.0.0.1:" + strconv.Itoa(testkit.FreePort(t)),
			"PGCONSISTENCY_TELEMETRY_PORT":      strconv.Itoa(testkit.FreePort(t)),
		}
		for k, v := range extra {
			e[k] = v
		}
		return e
	}
	// refused starts the collector and waits for its log to say why it
	// cannot read the database; pgconsistency_up stays 0.
	refused := func(t *testing.T, e map[string]string, want ...string) {
		t.Helper()
		p := startCollector(t, "config/collector-prometheus.yaml", e)
		var log string
		require.Eventually(t, func() bool {
			b, _ := os.ReadFile(p.log)
			log = string(b)
			for _, w := range want {
				if !strings.Contains(log, w) {
					return false
				}
			}
			return true
		}, 60*time.Second, 200*time.Millisecond, "the collector's log names the fix: %q", want)
		got, _, err := scrapeExporter(e["PGCONSISTENCY_PROMETHEUS_ENDPOINT"])
		if err == nil {
			assert.Empty(t, got, "no anomaly counts from a server it could not verify")
		}
		t.Logf("the collector says: %s", firstLineWith(log, want[0]))
	}

	t.Run("ca_file: verified, exact gauges", func(t *testing.T) {
		e := env(srv, map[string]string{"PGCONSISTENCY_DB_TLS_CA_FILE": ca.CertFile})
		startCollector(t, "config/collector-prometheus.yaml", e)
		want := fixture.Counts[float64]()
		var last map[string]float64
		require.Eventually(t, func() bool {
			got, labels, err := scrapeExporter(e["PGCONSISTENCY_PROMETHEUS_ENDPOINT"])
			if err != nil {
				return false
			}
			last = got
			return assert.ObjectsAreEqual(want, got) && labels["postgresql_database_name"] == db
		}, 60*time.Second, 200*time.Millisecond, "gauges over TLS verified with the CA: got %v, want %v", last, want)
	})
	t.Run("no ca_file: unknown authority", func(t *testing.T) {
		refused(t, env(srv, nil), "unknown authority", "tls::ca_file")
	})
	t.Run("wrong host name", func(t *testing.T) {
		other, otherKey := ca.IssueServerCert(t, "DNS:db.example")
		wrong := pgtest.Start(t, pgtest.WithTLS(other, otherKey)) // refused at the handshake: no database needed
		refused(t, env(wrong, map[string]string{"PGCONSISTENCY_DB_TLS_CA_FILE": ca.CertFile}),
			"not valid for host", "it names", "db.example", "tls::server_name_override")
	})
	t.Run("server without TLS", func(t *testing.T) {
		plain := pgtest.Start(t)
		refused(t, env(plain, map[string]string{"PGCONSISTENCY_DB_TLS_CA_FILE": ca.CertFile}),
			"does not support TLS", "tls::insecure: true")
	})
}

// firstLineWith is the first line of log that contains s.
func firstLineWith(log, s string) string {
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, s) {
			return l
		}
	}
	return ""
}
