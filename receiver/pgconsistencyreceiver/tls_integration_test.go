//go:build integration

package pgconsistencyreceiver

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/pdata/pmetric"
	"go.opentelemetry.io/collector/receiver/receivertest"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// newTestCA, issueServerCert and startTLSServer: pgtest's TLS helpers, by
// the names these tests use.
func newTestCA(t *testing.T, name string) pgtest.TestCA { return pgtest.NewTestCA(t, name) }

func startTLSServer(t *testing.T, cert, key []byte) *pgtest.Server {
	t.Helper()
	return pgtest.Start(t, pgtest.WithTLS(cert, key))
}

// scrapeOnce runs one scrape with cfg, as the collector's controller would,
// and returns pgconsistency.up and the scrape error.
func scrapeOnce(t *testing.T, cfg *Config) (int64, error) {
	t.Helper()
	require.NoError(t, cfg.Validate())
	s := newScraper(cfg, receivertest.NewNopSettings(metadata.Type), newPgxClient)
	require.NoError(t, s.start(t.Context(), nil))
	defer func() { require.NoError(t, s.shutdown(context.Background())) }()
	md, err := s.scrape(t.Context())
	up := int64(-1)
	for i := 0; i < md.ResourceMetrics().Len(); i++ {
		sms := md.ResourceMetrics().At(i).ScopeMetrics()
		for j := 0; j < sms.Len(); j++ {
			ms := sms.At(j).Metrics()
			for k := 0; k < ms.Len(); k++ {
				if m := ms.At(k); m.Name() == "pgconsistency.up" && m.Type() == pmetric.MetricTypeGauge && m.Gauge().DataPoints().Len() == 1 {
					up = m.Gauge().DataPoints().At(0).IntValue()
				}
			}
		}
	}
	return up, err
}

// verifyFull is tls: {insecure: false, insecure_skip_verify: false, ca_file: caFile}.
func verifyFull(caFile string) func(*Config) {
	return func(cfg *Config) {
		cfg.TLS.Insecure = false
		cfg.TLS.InsecureSkipVerify = false
		cfg.TLS.CAFile = caFile
	}
}

// TestTLS: the receiver against a PostgreSQL server with ssl = on, with the
// certificate verified (verify-full) or not (the default, sslmode=require),
// and the errors users meet when the TLS settings do not match the server.
func TestTLS(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "pgconsistency test CA")
	otherCA := newTestCA(t, "unrelated CA")
	cert, key := ca.IssueServerCert(t, "IP:127.0.0.1,DNS:localhost")

	srv := startTLSServer(t, cert, key)
	db := fixture.NewDatabase(t, srv, "dataset_head_ref_missing", "derivative_dependencies_missing")
	srv.Psql(t, db, "-c", "CALL pgconsistency.refresh()")
	want := map[string]int{
		"dataset_head_ref_missing":        len(fixture.Breakage["dataset_head_ref_missing"]),
		"derivative_dependencies_missing": len(fixture.Breakage["derivative_dependencies_missing"]),
	}

	t.Run("verify-full with the right CA", func(t *testing.T) {
		sink, _ := startReceiver(t, srv, db, verifyFull(ca.CertFile))
		waitFor(t, sink, "over verified TLS", expectCounts(want))

		// The server says the receiver's session is encrypted; pgtest's own
		// session (sslmode=disable) shows the column tells them apart.
		admin := srv.Conn(t, db)
		var receiverSessions, encrypted int
		require.NoError(t, admin.QueryRow(t.Context(), `
			SELECT count(*), count(*) FILTER (WHERE s.ssl)
			FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
			WHERE a.application_name = 'otelcol-pgconsistency'`).Scan(&receiverSessions, &encrypted))
		assert.GreaterOrEqual(t, receiverSessions, 1, "receiver sessions in pg_stat_activity")
		assert.Equal(t, receiverSessions, encrypted, "receiver sessions using TLS (pg_stat_ssl.ssl)")
		var adminSSL bool
		require.NoError(t, admin.QueryRow(t.Context(),
			"SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").Scan(&adminSSL))
		assert.False(t, adminSSL, "pgtest's own session does not use TLS")
	})

	t.Run("ca_file of another CA", func(t *testing.T) {
		cfg := serverConfig(srv, db)
		verifyFull(otherCA.CertFile)(cfg)
		up, err := scrapeOnce(t, cfg)
		assert.EqualValues(t, 0, up, "pgconsistency.up")
		require.Error(t, err)
		assert.ErrorContains(t, err, "signed by an unknown authority")
		assert.ErrorContains(t, err, `"tls::ca_file"`)
		t.Logf("error: %v", err)
	})

	t.Run("default tls: verified against the system's trust store", func(t *testing.T) {
		cfg := serverConfig(srv, db)
		defaults := createDefaultConfig()
		cfg.TLS = defaults.TLS
		require.False(t, cfg.TLS.Insecure)
		require.False(t, cfg.TLS.InsecureSkipVerify)
		// The test CA is in no system trust store: refused, and told why.
		up, err := scrapeOnce(t, cfg)
		require.Error(t, err)
		assert.ErrorContains(t, err, `set "tls::ca_file"`)
		assert.EqualValues(t, 0, up, "pgconsistency.up")
	})
	t.Run("insecure_skip_verify: encrypted, not verified", func(t *testing.T) {
		cfg := serverConfig(srv, db)
		cfg.TLS = createDefaultConfig().TLS
		cfg.TLS.InsecureSkipVerify = true
		up, err := scrapeOnce(t, cfg)
		require.NoError(t, err)
		assert.EqualValues(t, 1, up, "pgconsistency.up")
	})
}

// TestTLSWrongHostName: a certificate from the trusted CA but for another
// host fails verification with an error that names the mismatch.
func TestTLSWrongHostName(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "pgconsistency test CA")
	cert, key := ca.IssueServerCert(t, "DNS:db.example")
	srv := startTLSServer(t, cert, key)
	db := fixture.NewDatabase(t, srv)

	cfg := serverConfig(srv, db)
	verifyFull(ca.CertFile)(cfg)
	up, err := scrapeOnce(t, cfg)
	assert.EqualValues(t, 0, up, "pgconsistency.up")
	require.Error(t, err)
	assert.ErrorContains(t, err, `not valid for host "127.0.0.1": it names "db.example"`, "the name the certificate holds")
	assert.ErrorContains(t, err, `"tls::server_name_override"`)
	t.Logf("error: %v", err)

	// The fix the message offers works: the name the certificate has.
	cfg.TLS.ServerName = "db.example"
	up, err = scrapeOnce(t, cfg)
	require.NoError(t, err)
	assert.EqualValues(t, 1, up, "pgconsistency.up with tls::server_name_override")
}

// TestTLSServerWithoutTLS: the default tls settings require TLS, so a server
// with ssl = off is an error that says how to connect over plain TCP.
func TestTLSServerWithoutTLS(t *testing.T) {
	t.Parallel()
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv)

	cfg := serverConfig(srv, db)
	cfg.TLS = createDefaultConfig().TLS
	up, err := scrapeOnce(t, cfg)
	assert.EqualValues(t, 0, up, "pgconsistency.up")
	require.Error(t, err)
	assert.ErrorContains(t, err, "the server does not support TLS")
	assert.ErrorContains(t, err, `"tls::insecure: true"`)
	t.Logf("error: %v", err)
}
