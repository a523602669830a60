//go:build integration || e2e

package pgtest

import (
	"context"
	"crypto/hmac"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"
)

// superuser is the name of every cluster's superuser (Server.User).
const superuser = "postgres"

// initdbArgs are initdb's options after -D and --pwfile: the same for every
// cluster, so that one initdb can serve them all (see initdb).
var initdbArgs = []string{"-U", superuser, "--auth-local=trust", "--auth-host=scram-sha-256",
	"--encoding=UTF8", "--locale=C", "--no-sync"}

// initdb fills s.dataDir() with a new cluster. initdb costs about a second
// of CPU per cluster, and a test run starts a hundred clusters on two
// cores: so the first initdb's data directory is kept as a template in the
// user's cache directory (templateDir) and later clusters are copies of it,
// in any test binary, until PostgreSQL's version changes. A copy holds the
// superuser password of the cluster it came from, so it reports true:
// then setPassword sets s.Password once the server runs. Without a usable
// cache directory every cluster runs initdb.
func (s *Server) initdb(tb testing.TB) (fromTemplate bool) {
	tb.Helper()
	template := s.templateDir()
	if template != "" && fileExists(filepath.Join(template, "PG_VERSION")) {
		// -a: as root, the copy stays the postgres user's, mode 0700.
		out, err := exec.Command("cp", "-a", template, s.dataDir()).CombinedOutput()
		if err == nil {
			return true
		}
		tb.Logf("pgtest: copying the template cluster %s failed, running initdb: %v\n%s", template, err, out)
		if err := os.RemoveAll(s.dataDir()); err != nil {
			tb.Fatalf("pgtest: %v", err)
		}
	}

	pwFile := filepath.Join(s.dir, "pwfile")
	if err := s.writeFile(pwFile, s.Password+"\n"); err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	out, err := s.command("initdb", append([]string{"-D", s.dataDir(), "--pwfile", pwFile}, initdbArgs...)...).CombinedOutput()
	if err != nil {
		tb.Fatalf("pgtest: initdb: %v\n%s", err, out)
	}
	if err := os.Remove(pwFile); err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	if template != "" {
		saveTemplate(tb, s.dataDir(), template)
	}
	return false
}

// templateDir returns where the template cluster of s's PostgreSQL
// binaries and OS user is kept (it may not exist yet), or "" if there is no
// cache directory. The name changes with initdb's version and options.
func (s *Server) templateDir() string {
	cache, err := os.UserCacheDir()
	if err != nil {
		return ""
	}
	version, err := initdbVersion(s.bin)
	if err != nil {
		return ""
	}
	uid := os.Geteuid()
	if s.cred != nil {
		uid = int(s.cred.Uid)
	}
	key := sha256.Sum256(fmt.Appendf(nil, "%s\n%s\n%d\n%s", s.bin, version, uid, strings.Join(initdbArgs, " ")))
	return filepath.Join(cache, "pgconsistency", "pgtest", "initdb-"+hex.EncodeToString(key[:8]))
}

// initdbVersions caches `initdb --version` by bin directory.
var initdbVersions sync.Map

func initdbVersion(bin string) (string, error) {
	if v, ok := initdbVersions.Load(bin); ok {
		return v.(string), nil
	}
	out, err := exec.Command(filepath.Join(bin, "initdb"), "--version").Output()
	if err != nil {
		return "", err
	}
	initdbVersions.Store(bin, string(out))
	return string(out), nil
}

// saveTemplate copies a data directory fresh from initdb to template: into
// a directory of its own first, then renamed, so that a template is always
// whole, and the first of several test binaries saving it at once wins.
// Failing to save it only costs later clusters their own initdb.
func saveTemplate(tb testing.TB, dataDir, template string) {
	tb.Helper()
	if err := os.MkdirAll(filepath.Dir(template), 0o755); err != nil {
		tb.Logf("pgtest: not keeping a template cluster: %v", err)
		return
	}
	tmp, err := os.MkdirTemp(filepath.Dir(template), filepath.Base(template)+".partial-")
	if err != nil {
		tb.Logf("pgtest: not keeping a template cluster: %v", err)
		return
	}
	defer os.RemoveAll(tmp)
	copied := filepath.Join(tmp, "data")
	if out, err := exec.Command("cp", "-a", dataDir, copied).CombinedOutput(); err != nil {
		tb.Logf("pgtest: not keeping a template cluster: %v\n%s", err, out)
		return
	}
	// Another test binary may have been first: then keep its template.
	_ = os.Rename(copied, template)
}

// setPassword gives the superuser of a cluster copied from the template
// s.Password. It connects over the unix socket (trust authentication) and
// sends the password's SCRAM verifier, never the password itself, as
// psql's \password does.
func (s *Server) setPassword(tb testing.TB) {
	tb.Helper()
	dsn := url.URL{Scheme: "postgres", Path: "/postgres", RawQuery: url.Values{
		"host": {s.dir}, "port": {strconv.Itoa(s.Port)}, "user": {s.User}, "sslmode": {"disable"},
	}.Encode()}
	conn, err := pgx.Connect(tb.Context(), dsn.String())
	if err != nil {
		tb.Fatalf("pgtest: connecting over the unix socket in %s: %v", s.dir, err)
	}
	defer conn.Close(context.Background())
	verifier, err := scramVerifier(s.Password)
	if err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	// A verifier is base64 and punctuation: nothing to quote.
	if _, err := conn.Exec(tb.Context(), "ALTER ROLE "+pgx.Identifier{s.User}.Sanitize()+" PASSWORD '"+verifier+"'"); err != nil {
		tb.Fatalf("pgtest: setting the superuser's password: %v", err)
	}
}

// scramVerifier returns the SCRAM-SHA-256 verifier PostgreSQL stores for
// password (RFC 5802, RFC 7677; PostgreSQL's scram_build_secret), with a
// random salt and PostgreSQL's default 4096 iterations. password must be
// ASCII, which SASLprep leaves as is.
func scramVerifier(password string) (string, error) {
	const iterations = 4096
	salt := make([]byte, 16)
	if _, err := rand.Read(salt); err != nil {
		return "", err
	}
	salted, err := pbkdf2.Key(sha256.New, password, salt, iterations, sha256.Size)
	if err != nil {
		return "", err
	}
	mac := func(key []byte, msg string) []byte {
		h := hmac.New(sha256.New, key)
		h.Write([]byte(msg))
		return h.Sum(nil)
	}
	storedKey := sha256.Sum256(mac(salted, "Client Key"))
	serverKey := mac(salted, "Server Key")
	b64 := base64.StdEncoding.EncodeToString
	return fmt.Sprintf("SCRAM-SHA-256$%d:%s$%s:%s", iterations, b64(salt), b64(storedKey[:]), b64(serverKey)), nil
}
