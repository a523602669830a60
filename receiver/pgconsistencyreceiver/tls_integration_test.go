//go:build integration

package pgconsistencyreceiver

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/pdata/pmetric"
	"go.opentelemetry.io/collector/receiver/receivertest"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
	"github.com/pgconsistency/pgconsistency/receiver/pgconsistencyreceiver/internal/metadata"
)

// testCA is a throwaway certificate authority made with the openssl CLI.
type testCA struct {
	dir      string
	certFile string // PEM, what tls::ca_file points at
	keyFile  string
}

// openssl runs the openssl CLI in dir and fails the test if it fails.
func openssl(t *testing.T, dir string, args ...string) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), "openssl", args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "openssl %v (install it with apt-get install openssl):\n%s", args, out)
}

// newTestCA creates a self-signed CA named name in its own directory.
func newTestCA(t *testing.T, name string) testCA {
	t.Helper()
	dir := t.TempDir()
	openssl(t, dir, "req", "-x509", "-new", "-nodes",
		"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
		"-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN="+name,
		"-addext", "basicConstraints=critical,CA:TRUE",
		"-addext", "keyUsage=critical,keyCertSign,cRLSign")
	return testCA{dir: dir, certFile: filepath.Join(dir, "ca.crt"), keyFile: filepath.Join(dir, "ca.key")}
}

// issueServerCert returns the PEM certificate and key of a server whose
// subjectAltName is san (e.g. "IP:127.0.0.1,DNS:localhost"), signed by ca.
func (ca testCA) issueServerCert(t *testing.T, san string) (cert, key []byte) {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "ext.cnf"),
		[]byte("subjectAltName = "+san+"\nextendedKeyUsage = serverAuth\nbasicConstraints = CA:FALSE\n"), 0o600))
	openssl(t, dir, "req", "-new", "-nodes",
		"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
		"-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=pgconsistency test server")
	openssl(t, dir, "x509", "-req", "-in", "server.csr", "-CA", ca.certFile, "-CAkey", ca.keyFile,
		"-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
	cert, err := os.ReadFile(filepath.Join(dir, "server.crt"))
	require.NoError(t, err)
	key, err = os.ReadFile(filepath.Join(dir, "server.key"))
	require.NoError(t, err)
	return cert, key
}

// startTLSServer starts a cluster with ssl = on and the given certificate.
func startTLSServer(t *testing.T, cert, key []byte) *pgtest.Server {
	t.Helper()
	return pgtest.Start(t,
		pgtest.WithDataFile("server.crt", cert),
		pgtest.WithDataFile("server.key", key),
		pgtest.WithSetting("ssl", "on"),
		pgtest.WithSetting("ssl_cert_file", "server.crt"),
		pgtest.WithSetting("ssl_key_file", "server.key"))
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
	ca := newTestCA(t, "pgconsistency test CA")
	otherCA := newTestCA(t, "unrelated CA")
	cert, key := ca.issueServerCert(t, "IP:127.0.0.1,DNS:localhost")

	srv := startTLSServer(t, cert, key)
	db := fixture.NewDatabase(t, srv, "dataset_head_ref_missing", "derivative_dependencies_missing")
	srv.Psql(t, db, "-c", "CALL pgconsistency.refresh()")
	want := map[string]int{
		"dataset_head_ref_missing":        len(fixture.Breakage["dataset_head_ref_missing"]),
		"derivative_dependencies_missing": len(fixture.Breakage["derivative_dependencies_missing"]),
	}

	t.Run("verify-full with the right CA", func(t *testing.T) {
		sink, _ := startReceiver(t, srv, db, verifyFull(ca.certFile))
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
		verifyFull(otherCA.certFile)(cfg)
		up, err := scrapeOnce(t, cfg)
		assert.EqualValues(t, 0, up, "pgconsistency.up")
		require.Error(t, err)
		assert.ErrorContains(t, err, "not signed by a CA the receiver trusts")
		assert.ErrorContains(t, err, `"tls::ca_file"`)
		t.Logf("error: %v", err)
	})

	t.Run("default tls: encrypted, not verified", func(t *testing.T) {
		cfg := serverConfig(srv, db)
		defaults := createDefaultConfig()
		cfg.TLS = defaults.TLS
		require.False(t, cfg.TLS.Insecure)
		require.True(t, cfg.TLS.InsecureSkipVerify)
		up, err := scrapeOnce(t, cfg)
		require.NoError(t, err)
		assert.EqualValues(t, 1, up, "pgconsistency.up")
	})
}

// TestTLSWrongHostName: a certificate from the trusted CA but for another
// host fails verification with an error that names the mismatch.
func TestTLSWrongHostName(t *testing.T) {
	ca := newTestCA(t, "pgconsistency test CA")
	cert, key := ca.issueServerCert(t, "DNS:db.example")
	srv := startTLSServer(t, cert, key)
	db := fixture.NewDatabase(t, srv)

	cfg := serverConfig(srv, db)
	verifyFull(ca.certFile)(cfg)
	up, err := scrapeOnce(t, cfg)
	assert.EqualValues(t, 0, up, "pgconsistency.up")
	require.Error(t, err)
	assert.ErrorContains(t, err, `not valid for host "127.0.0.1"`)
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
