//go:build integration || e2e

package pgtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestCA is a throwaway certificate authority made with the openssl CLI, for
// servers with TLS (WithTLS) whose certificates a client verifies.
type TestCA struct {
	Dir      string
	CertFile string // PEM: what a client's CA file (tls::ca_file) points at
	keyFile  string
}

// openssl runs the openssl CLI in dir and fails the test if it fails.
func openssl(tb testing.TB, dir string, args ...string) {
	tb.Helper()
	cmd := exec.CommandContext(tb.Context(), "openssl", args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("pgtest: openssl %v (install it with apt-get install openssl): %v\n%s", args, err, out)
	}
}

// NewTestCA creates a self-signed CA named name in a directory of its own.
func NewTestCA(tb testing.TB, name string) TestCA {
	tb.Helper()
	dir := tb.TempDir()
	openssl(tb, dir, "req", "-x509", "-new", "-nodes",
		"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
		"-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN="+name,
		"-addext", "basicConstraints=critical,CA:TRUE",
		"-addext", "keyUsage=critical,keyCertSign,cRLSign")
	return TestCA{Dir: dir, CertFile: filepath.Join(dir, "ca.crt"), keyFile: filepath.Join(dir, "ca.key")}
}

// IssueServerCert returns the PEM certificate and key of a server whose
// subjectAltName is san (e.g. "IP:127.0.0.1,DNS:localhost"), signed by ca.
func (ca TestCA) IssueServerCert(tb testing.TB, san string) (cert, key []byte) {
	tb.Helper()
	dir := tb.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "ext.cnf"),
		[]byte("subjectAltName = "+san+"\nextendedKeyUsage = serverAuth\nbasicConstraints = CA:FALSE\n"), 0o600); err != nil {
		tb.Fatal(err)
	}
	openssl(tb, dir, "req", "-new", "-nodes",
		"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
		"-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=pgconsistency test server")
	openssl(tb, dir, "x509", "-req", "-in", "server.csr", "-CA", ca.CertFile, "-CAkey", ca.keyFile,
		"-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
	cert, err := os.ReadFile(filepath.Join(dir, "server.crt"))
	if err != nil {
		tb.Fatal(err)
	}
	if key, err = os.ReadFile(filepath.Join(dir, "server.key")); err != nil {
		tb.Fatal(err)
	}
	return cert, key
}

// WithTLS makes the server accept TLS (ssl = on) with the given PEM
// certificate and key; plain TCP is still accepted.
func WithTLS(cert, key []byte) Option {
	return func(o *options) {
		WithDataFile("server.crt", cert)(o)
		WithDataFile("server.key", key)(o)
		WithSetting("ssl", "on")(o)
		WithSetting("ssl_cert_file", "server.crt")(o)
		WithSetting("ssl_key_file", "server.key")(o)
	}
}
