//go:build integration || e2e

// Package pgtest gives tests a real, throwaway PostgreSQL server.
//
// Start creates a fresh cluster with initdb in its own temporary directory,
// starts it on a free 127.0.0.1 port and registers a tb.Cleanup that stops it
// and removes the directory, whether or not the test failed:
//
//	srv := pgtest.Start(t)
//	db := srv.CreateDatabase(t, "")
//	conn := srv.Conn(t, db)
//	out := srv.Psql(t, db, "-tAc", "SELECT 1")
//
// Every cluster has its own directory and port, so any number of them may run
// at once, in one test binary or in many test binaries running in parallel.
//
// initdb runs once per machine and PostgreSQL version: its data directory is
// kept in the user's cache directory ($XDG_CACHE_HOME or ~/.cache, under
// pgconsistency/pgtest/) and each cluster is a copy of it, with a superuser
// password of its own. That saves a second of CPU per cluster; removing the
// directory is always safe (the next Start runs initdb again).
//
// # Server binaries
//
// The PostgreSQL bin directory is taken from $PGCONSISTENCY_PGBIN if set,
// else from `pg_config --bindir`, else the highest /usr/lib/postgresql/*/bin.
// If no initdb is found the test fails (it is not skipped): run `make test` as
// root, which installs postgresql-15, or point $PGCONSISTENCY_TEST_DSN at an
// existing server.
//
// PostgreSQL refuses to run as root. When the tests run as root, the cluster is
// created under /tmp, owned by the "postgres" OS user, and initdb, pg_ctl and
// the server run with that user's credentials. Otherwise they run as the
// current user.
//
// # Cluster configuration
//
// The superuser is "postgres" with a random password (Server.Password).
// Connections over the unix socket (in the temporary directory, reachable only
// by its owner) use trust authentication; TCP connections to 127.0.0.1 need the
// password (scram-sha-256). Durability is traded for speed with fsync=off and
// full_page_writes=off, which only matters if the machine itself crashes.
// synchronous_commit stays on: with fsync=off it costs next to nothing, and
// turning it off would let StopImmediate lose transactions that were already
// reported as committed. When pg_cron.so is installed it is preloaded with
// cron.database_name = 'postgres' (see Server.HasPgCron). The server log is
// written to postgres.log in the temporary directory.
//
// Server.StartStandby adds a streaming-replication hot standby of a cluster,
// in a temporary directory and on a port of its own.
//
// # PgBouncer
//
// Server.StartPgBouncer starts Debian's pgbouncer (1.18) in front of one
// database, as a child process of the test binary, on a free 127.0.0.1 port
// and in a temporary directory of its own:
//
//	b := srv.StartPgBouncer(t, db)
//	role, password := srv.CreateLoginRole(t, db, "reader_")
//	b.AddUser(t, role, password)
//	conn, err := pgx.Connect(ctx, b.DSN(srv.User, srv.Password))
//
// It pools in transaction mode and keeps pgbouncer's defaults otherwise. In
// particular ignore_startup_parameters is not set, so, as with a production
// PgBouncer, a client sending any startup parameter but client_encoding,
// DateStyle, TimeZone, standard_conforming_strings and application_name is
// refused with "unsupported startup parameter". Since each transaction may
// get another server connection, clients need a pgx query exec mode that
// keeps no named prepared statements (pgbouncer 1.18 does not track them).
// pgbouncer is taken from $PATH or /usr/sbin; `make test` installs it. Like
// the server, it runs as the "postgres" OS user when the tests run as root.
//
// # External server
//
// If $PGCONSISTENCY_TEST_DSN is set to a postgres:// URL of a superuser on an
// existing server, Start uses that server instead of creating a cluster.
// CreateDatabase then creates uniquely named databases there and drops them at
// cleanup; tests that need to stop or start the server, or that pass options
// to Start, are skipped.
//
// # Leftover clusters
//
// Cleanup only runs if the test binary exits normally. If it is killed (for
// example by SIGKILL, Ctrl-C, or the panic of `go test -timeout`), the server
// keeps running (pg_ctl puts it in a session of its own, so Ctrl-C does not
// reach it) and its /tmp/pgtest-* directory stays behind. Removing the
// directory is enough to get rid of such a server: the postmaster checks about
// once a minute that its postmaster.pid still exists and shuts down if it
// does not. To stop one at once:
//
//	pg_ctl -D /tmp/pgtest-XXXX/data stop -m immediate   # as postgres when root
//
// A pgbouncer, on the other hand, gets SIGKILL when the test binary dies,
// however it dies (a parent-death signal); only its pgbouncer-* directory
// (under /tmp when root) stays behind. Should one survive anyway, its pid is
// in the pgbouncer.pid file of that directory.
package pgtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgconsistency/pgconsistency/internal/testkit"
)

// Environment variables read by Start.
const (
	// EnvTestDSN, if set, is a postgres:// URL of a superuser on an existing
	// server that Start uses instead of creating a cluster.
	EnvTestDSN = "PGCONSISTENCY_TEST_DSN"
	// EnvPgBin, if set, is the directory holding initdb, pg_ctl and postgres.
	EnvPgBin = "PGCONSISTENCY_PGBIN"
)

// pgCtlTimeout is how long pg_ctl waits for the server to start or stop.
const pgCtlTimeout = "60"

// startAttempts bounds how often Start picks a new port after losing a race
// for the previous one (see startCluster).
const startAttempts = 3

// Server is a running PostgreSQL server for tests.
//
// Stop, StopImmediate and StartAgain must not be called concurrently with
// other methods; all other methods are safe for concurrent use.
type Server struct {
	Host     string // TCP host, 127.0.0.1 for clusters started by Start
	Port     int
	User     string // superuser
	Password string // superuser password

	url       *url.URL // DSN of the default database
	hasPgCron bool
	external  bool // from $PGCONSISTENCY_TEST_DSN, not started by Start

	// Only set for clusters started by Start.
	dir  string              // temporary directory: data dir, socket, log
	bin  string              // PostgreSQL bin directory
	cred *syscall.Credential // server OS user when running as root, else nil
	opts options             // from Start, kept for the config of standbys
}

// Option configures Start.
type Option func(*options)

type options struct {
	settings  [][2]string
	dataFiles [][2]string // name in the data directory, content
}

// WithSetting sets a server configuration parameter, overriding pgtest's own
// choice for it if any. The value is written quoted to the configuration
// file, e.g. WithSetting("wal_level", "logical"). Tests passing options are
// skipped when an external server is used, since it cannot be reconfigured.
func WithSetting(name, value string) Option {
	return func(o *options) { o.settings = append(o.settings, [2]string{name, value}) }
}

// WithDataFile writes a file into the cluster's data directory before the
// server first starts, owned by the server's OS user and readable only by it
// (mode 0600), as PostgreSQL requires of a private key. Settings that take a
// path resolve relative paths in the data directory, so a TLS server is
//
//	pgtest.Start(t,
//		pgtest.WithDataFile("server.crt", cert), pgtest.WithDataFile("server.key", key),
//		pgtest.WithSetting("ssl", "on"),
//		pgtest.WithSetting("ssl_cert_file", "server.crt"), pgtest.WithSetting("ssl_key_file", "server.key"))
//
// name must be a plain file name. Standbys get the files with the base backup.
func WithDataFile(name string, content []byte) Option {
	return func(o *options) { o.dataFiles = append(o.dataFiles, [2]string{name, string(content)}) }
}

// Start returns a running server for the test. Unless $PGCONSISTENCY_TEST_DSN
// names a server to use, it starts a new cluster and registers a tb.Cleanup
// that stops it and removes all its files.
func Start(tb testing.TB, opts ...Option) *Server {
	tb.Helper()
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	var s *Server
	if dsn := os.Getenv(EnvTestDSN); dsn != "" {
		if len(o.settings) > 0 || len(o.dataFiles) > 0 {
			tb.Skipf("pgtest: server options need a cluster started by the test, but %s is set", EnvTestDSN)
		}
		s = useExternal(tb, dsn)
	} else {
		s = startCluster(tb, o)
	}
	s.hasPgCron = s.queryHasPgCron(tb)
	return s
}

func useExternal(tb testing.TB, dsn string) *Server {
	tb.Helper()
	u, err := url.Parse(dsn)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		tb.Fatalf("pgtest: %s must be a postgres:// URL", EnvTestDSN)
	}
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		tb.Fatalf("pgtest: parsing %s: %v", EnvTestDSN, err)
	}
	return &Server{
		Host:     cfg.Host,
		Port:     int(cfg.Port),
		User:     cfg.User,
		Password: cfg.Password,
		url:      u,
		external: true,
	}
}

func startCluster(tb testing.TB, o options) *Server {
	tb.Helper()
	bin, err := findBinDir()
	if err != nil {
		tb.Fatalf("pgtest: %v. Run `make test` as root (it installs postgresql-15) or set %s to the postgres:// URL of a superuser on an existing server", err, EnvTestDSN)
	}
	cred, err := serverCredential()
	if err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	s := newServer(tb, bin, cred, rand.Text(), o)

	fromTemplate := s.initdb(tb)
	if err := s.appendToFile(filepath.Join(s.dataDir(), "postgresql.conf"), "\ninclude 'pgtest.conf'\n"); err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	for _, f := range o.dataFiles {
		if f[0] != filepath.Base(f[0]) || f[0] == "." || f[0] == ".." {
			tb.Fatalf("pgtest: WithDataFile(%q): expected a plain file name", f[0])
		}
		if err := s.writeFile(filepath.Join(s.dataDir(), f[0]), f[1]); err != nil {
			tb.Fatalf("pgtest: %v", err)
		}
	}
	s.startOnFreePort(tb)
	if fromTemplate {
		s.setPassword(tb)
	}
	return s
}

// newServer returns a Server for a cluster yet to be created in a new
// temporary directory owned by the server's OS user, and registers the
// cleanup that stops the server and removes the directory.
func newServer(tb testing.TB, bin string, cred *syscall.Credential, password string, o options) *Server {
	tb.Helper()
	// As root, the directory must be somewhere the postgres user can reach;
	// $TMPDIR might not be. /tmp also keeps the socket path short.
	parent := ""
	if cred != nil {
		parent = "/tmp"
	}
	dir, err := os.MkdirTemp(parent, "pgtest-")
	if err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	s := &Server{
		Host:     "127.0.0.1",
		User:     superuser,
		Password: password,
		dir:      dir,
		bin:      bin,
		cred:     cred,
		opts:     o,
	}
	// Registered before anything can fail so that even a half-built cluster
	// is cleaned up.
	tb.Cleanup(func() { s.destroy(tb) })
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			tb.Fatalf("pgtest: %v", err)
		}
	}
	return s
}

// startOnFreePort writes pgtest.conf for a free port and starts the server
// in s.dataDir() for the first time.
func (s *Server) startOnFreePort(tb testing.TB) {
	tb.Helper()
	onFreePort(tb, "server", s.dir, func(port int) error {
		s.Port = port
		return s.writeFile(filepath.Join(s.dataDir(), "pgtest.conf"), s.config())
	}, s.start)
	s.url = &url.URL{
		Scheme: "postgres",
		User:   url.UserPassword(s.User, s.Password),
		Host:   net.JoinHostPort(s.Host, strconv.Itoa(s.Port)),
		Path:   "/postgres",
		// The cluster has no certificate; don't ask for TLS first.
		RawQuery: "sslmode=disable",
	}
}

// StartStandby starts a streaming-replication standby of s (a hot standby,
// read-only, pg_is_in_recovery() = true) and returns it; it is stopped and removed at cleanup.
//
// The standby is a base backup of s taken with pg_basebackup, configured like
// s (including options passed to Start) but with a directory and port of its
// own. It has the same superuser and password as s. Replication is
// asynchronous: a transaction committed on s shows up on the standby a moment
// later. The standby keeps following s across Stop and StartAgain of either.
// Tests are skipped when an external server is used.
//
// A standby of a standby needs WithSetting("full_page_writes", "on") for the
// first server: PostgreSQL refuses to take a base backup of a standby that
// replayed WAL written with full_page_writes=off, pgtest's default.
func (s *Server) StartStandby(tb testing.TB) *Server {
	tb.Helper()
	s.needCluster(tb)
	standby := newServer(tb, s.bin, s.cred, s.Password, s.opts)
	standby.hasPgCron = s.hasPgCron // same binaries and configuration
	// Both pg_basebackup and the standby's WAL receiver (primary_conninfo,
	// written by -R) connect over the primary's unix socket: initdb's
	// pg_hba.conf gives "local replication" connections the --auth-local
	// method, trust, so no password is needed. With -X stream the backup
	// includes the WAL it needs to be consistent; -c fast does not wait for
	// the next scheduled checkpoint. Like initdb's, --no-sync skips fsyncing
	// files that are thrown away anyway.
	out, err := standby.command("pg_basebackup", "-D", standby.dataDir(), "-R", "-X", "stream", "-c", "fast", "--no-sync",
		"-h", s.dir, "-p", strconv.Itoa(s.Port), "-U", s.User).CombinedOutput()
	if err != nil {
		tb.Fatalf("pgtest: pg_basebackup of the server in %s: %v\n%s", s.dir, err, out)
	}
	// The backup copied the primary's pgtest.conf, with its port and socket
	// directory; startOnFreePort rewrites it for the standby. pg_ctl start
	// waits until the standby accepts (read-only) connections.
	standby.startOnFreePort(tb)

	conn, err := pgx.Connect(tb.Context(), standby.DSN(""))
	if err != nil {
		tb.Fatalf("pgtest: connecting to the standby in %s: %v", standby.dir, err)
	}
	defer conn.Close(context.Background())
	var inRecovery bool
	if err := conn.QueryRow(tb.Context(), "SELECT pg_is_in_recovery()").Scan(&inRecovery); err != nil {
		tb.Fatalf("pgtest: querying the standby in %s: %v", standby.dir, err)
	}
	if !inRecovery {
		tb.Fatalf("pgtest: the standby in %s is not in recovery", standby.dir)
	}
	return standby
}

// config returns the contents of pgtest.conf, which postgresql.conf includes
// at its end so that these settings win over initdb's.
func (s *Server) config() string {
	settings := [][2]string{
		{"port", strconv.Itoa(s.Port)},
		{"listen_addresses", s.Host},
		{"unix_socket_directories", s.dir},
		{"fsync", "off"},
		{"full_page_writes", "off"},
		// How long a standby waits before it tries again to connect to the
		// primary, e.g. after the primary's StartAgain; 5s by default.
		{"wal_retrieve_retry_interval", "200ms"},
	}
	if fileExists(filepath.Join(s.pkgLibDir(), "pg_cron.so")) {
		settings = append(settings,
			[2]string{"shared_preload_libraries", "pg_cron"},
			[2]string{"cron.database_name", "postgres"},
			// pg_cron runs jobs over libpq connections to cron.host, by
			// default "localhost" over TCP, where a password is required.
			// The socket directory gets trust authentication instead.
			[2]string{"cron.host", s.dir},
		)
	}
	settings = append(settings, s.opts.settings...)
	var b strings.Builder
	for _, kv := range settings {
		fmt.Fprintf(&b, "%s = '%s'\n", kv[0], strings.ReplaceAll(kv[1], "'", "''"))
	}
	return b.String()
}

// start runs pg_ctl start. If that fails, it returns what the server logged
// meanwhile along with the error.
func (s *Server) start() (log string, err error) {
	logFile := filepath.Join(s.dir, "postgres.log")
	var offset int64
	if fi, err := os.Stat(logFile); err == nil {
		offset = fi.Size()
	}
	out, err := s.command("pg_ctl", "start", "-D", s.dataDir(), "-w", "-t", pgCtlTimeout, "-l", logFile).CombinedOutput()
	if err == nil {
		return "", nil
	}
	err = fmt.Errorf("pg_ctl start: %w\n%s", err, out)
	f, openErr := os.Open(logFile)
	if openErr != nil {
		return "", errors.Join(err, openErr)
	}
	defer f.Close()
	b, readErr := io.ReadAll(io.NewSectionReader(f, offset, 1<<62))
	return string(b), errors.Join(err, readErr)
}

// destroy stops the server if it is running and removes its directory.
func (s *Server) destroy(tb testing.TB) {
	// pg_ctl status exits non-zero if the server is not running, also when
	// postmaster.pid is stale or the data directory does not exist yet.
	if s.command("pg_ctl", "status", "-D", s.dataDir()).Run() == nil {
		if out, err := s.pgCtlStop("immediate"); err != nil {
			tb.Errorf("pgtest: stopping server in %s: %v\n%s", s.dir, err, out)
		}
	}
	if err := os.RemoveAll(s.dir); err != nil {
		tb.Errorf("pgtest: %v", err)
	}
}

// HasPgCron reports whether pg_cron is preloaded, so that
// CREATE EXTENSION pg_cron works in the database named by cron.database_name
// ("postgres" for clusters started by Start).
func (s *Server) HasPgCron() bool { return s.hasPgCron }

func (s *Server) queryHasPgCron(tb testing.TB) bool {
	tb.Helper()
	conn, err := pgx.Connect(tb.Context(), s.DSN(""))
	if err != nil {
		tb.Fatalf("pgtest: connecting to %s: %v", s.url.Redacted(), err)
	}
	defer conn.Close(context.Background())
	var has bool
	err = conn.QueryRow(tb.Context(), `
		SELECT 'pg_cron' = ANY (string_to_array(replace(current_setting('shared_preload_libraries'), ' ', ''), ','))
			AND EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pg_cron')`).Scan(&has)
	if err != nil {
		tb.Fatalf("pgtest: checking for pg_cron: %v", err)
	}
	return has
}

// DSN returns a postgres:// URL for database db, or for the server's default
// database if db is empty ("postgres" for clusters started by Start).
func (s *Server) DSN(db string) string {
	u := *s.url
	if db != "" {
		u.Path = "/" + db
		u.RawPath = ""
	}
	return u.String()
}

// CreateDatabase creates an empty database and returns its name. If name is
// empty, a unique name is chosen. On an external server the database is
// dropped at cleanup; a cluster started by Start is removed as a whole.
func (s *Server) CreateDatabase(tb testing.TB, name string) string {
	tb.Helper()
	if name == "" {
		name = "pgtest_" + strings.ToLower(rand.Text())
	}
	ident := pgx.Identifier{name}.Sanitize()
	conn, err := pgx.Connect(tb.Context(), s.DSN(""))
	if err != nil {
		tb.Fatalf("pgtest: connecting to %s: %v", s.url.Redacted(), err)
	}
	defer conn.Close(context.Background())
	// template0 is guaranteed empty, and since nobody can connect to it,
	// concurrent CREATE DATABASE calls cannot fail with "source database is
	// being accessed by other users" as they can with template1.
	if _, err := conn.Exec(tb.Context(), "CREATE DATABASE "+ident+" TEMPLATE template0"); err != nil {
		tb.Fatalf("pgtest: creating database %s: %v", ident, err)
	}
	if s.external {
		tb.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			conn, err := pgx.Connect(ctx, s.DSN(""))
			if err != nil {
				tb.Errorf("pgtest: connecting to %s to drop %s: %v", s.url.Redacted(), ident, err)
				return
			}
			defer conn.Close(ctx)
			// FORCE: connections the test left open must not keep it.
			if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+ident+" WITH (FORCE)"); err != nil {
				tb.Errorf("pgtest: dropping database %s: %v", ident, err)
			}
		})
	}
	return name
}

// CreateLoginRole creates a LOGIN role named prefix plus random hex digits,
// with a random password and no privileges, and returns both. At cleanup it
// drops what the role owns in database db, then the role. Call it before
// connecting as the role: cleanups run last in, first out, so the role's
// connections are closed by then.
func (s *Server) CreateLoginRole(tb testing.TB, db, prefix string) (role, password string) {
	tb.Helper()
	secret := make([]byte, 8)
	_, _ = rand.Read(secret)
	role = prefix + hex.EncodeToString(secret[:4])
	password = hex.EncodeToString(secret)
	ident := pgx.Identifier{role}.Sanitize()
	conn, err := pgx.Connect(tb.Context(), s.DSN(db))
	if err != nil {
		tb.Fatalf("pgtest: connecting to %s: %v", db, err)
	}
	defer conn.Close(context.Background())
	// hex: nothing to quote in the password
	if _, err := conn.Exec(tb.Context(), "CREATE ROLE "+ident+" LOGIN PASSWORD '"+password+"'"); err != nil {
		tb.Fatalf("pgtest: creating role %s: %v", role, err)
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		conn, err := pgx.Connect(ctx, s.DSN(db))
		if err != nil {
			tb.Logf("pgtest: dropping role %s: %v", role, err)
			return
		}
		defer conn.Close(ctx)
		for _, q := range []string{"DROP OWNED BY " + ident, "DROP ROLE " + ident} {
			if _, err := conn.Exec(ctx, q); err != nil {
				tb.Logf("pgtest: cleanup: %s: %v", q, err)
			}
		}
	})
	return role, password
}

// Conn returns a connection to database db (the default database if empty)
// that is closed at cleanup.
func (s *Server) Conn(tb testing.TB, db string) *pgx.Conn {
	tb.Helper()
	conn, err := pgx.Connect(tb.Context(), s.DSN(db))
	if err != nil {
		tb.Fatalf("pgtest: connecting to database %q: %v", db, err)
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn.Close(ctx)
	})
	return conn
}

// Psql runs `psql -X -v ON_ERROR_STOP=1` with args against database db (the
// default database if empty) and returns its standard output. If psql fails,
// the test fails with psql's standard output and error.
func (s *Server) Psql(tb testing.TB, db string, args ...string) string {
	tb.Helper()
	psql := "psql"
	if p := filepath.Join(s.bin, "psql"); s.bin != "" && fileExists(p) {
		psql = p // same version as the server
	}
	// The password goes in the environment rather than on the command line,
	// where ps would show it.
	u, err := url.Parse(s.DSN(db))
	if err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	if u.User != nil {
		u.User = url.User(u.User.Username())
	}
	cmd := exec.CommandContext(tb.Context(), psql,
		append([]string{"-X", "-v", "ON_ERROR_STOP=1", "-d", u.String()}, args...)...)
	cmd.Env = os.Environ()
	if s.Password != "" {
		cmd.Env = append(cmd.Env, "PGPASSWORD="+s.Password)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		tb.Fatalf("pgtest: psql %s on database %q: %v\nstdout:\n%s\nstderr:\n%s",
			strings.Join(args, " "), db, err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// PsqlFile runs the SQL script at path with Psql.
func (s *Server) PsqlFile(tb testing.TB, db, path string) string {
	tb.Helper()
	return s.Psql(tb, db, "-f", path)
}

// Stop shuts the server down with `pg_ctl stop -m fast`, keeping its data.
// Connections from Conn are broken by it.
func (s *Server) Stop(tb testing.TB) {
	tb.Helper()
	s.stop(tb, "fast")
}

// StopImmediate shuts the server down with `pg_ctl stop -m immediate`, as if
// it crashed: the next start runs crash recovery.
func (s *Server) StopImmediate(tb testing.TB) {
	tb.Helper()
	s.stop(tb, "immediate")
}

func (s *Server) stop(tb testing.TB, mode string) {
	tb.Helper()
	s.needCluster(tb)
	if out, err := s.pgCtlStop(mode); err != nil {
		tb.Fatalf("pgtest: pg_ctl stop -m %s: %v\n%s", mode, err, out)
	}
}

func (s *Server) pgCtlStop(mode string) ([]byte, error) {
	return s.command("pg_ctl", "stop", "-D", s.dataDir(), "-w", "-t", pgCtlTimeout, "-m", mode).CombinedOutput()
}

// StartAgain starts a stopped server on the same port and data directory.
// It fails the test if something else took the port in the meantime.
func (s *Server) StartAgain(tb testing.TB) {
	tb.Helper()
	s.needCluster(tb)
	if log, err := s.start(); err != nil {
		tb.Fatalf("pgtest: restarting server in %s: %v\nserver log:\n%s", s.dir, err, tail(log))
	}
}

// Promote makes a standby of StartStandby a primary (`pg_ctl promote`), as
// a failover does, and waits until it accepts writes. What the old primary
// had that a standby does not copy (its replication slots, the contents of
// its unlogged tables) is not there.
func (s *Server) Promote(tb testing.TB) {
	tb.Helper()
	s.needCluster(tb)
	if out, err := s.command("pg_ctl", "promote", "-D", s.dataDir(), "-w", "-t", pgCtlTimeout).CombinedOutput(); err != nil {
		tb.Fatalf("pgtest: pg_ctl promote of the standby in %s: %v\n%s", s.dir, err, out)
	}
}

func (s *Server) needCluster(tb testing.TB) {
	tb.Helper()
	if s.external {
		tb.Skipf("pgtest: needs a cluster started by the test, but %s is set", EnvTestDSN)
	}
}

func (s *Server) dataDir() string { return filepath.Join(s.dir, "data") }

// command prepares a server-side program from the bin directory to run as the
// server's OS user.
func (s *Server) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(s.bin, name), args...)
	// The postgres user may not be allowed into the test's directory.
	cmd.Dir = s.dir
	// Keep PGDATA, PGPORT etc. meant for another server out of this one.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PG") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	if s.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
	}
	return cmd
}

// writeFile creates a file readable by the server's OS user.
func (s *Server) writeFile(path, content string) error {
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		return err
	}
	if s.cred != nil {
		return os.Chown(path, int(s.cred.Uid), int(s.cred.Gid))
	}
	return nil
}

func (s *Server) appendToFile(path, content string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(content)
	return errors.Join(err, f.Close())
}

// pkgLibDir returns the directory of the server's extension libraries.
func (s *Server) pkgLibDir() string {
	if out, err := exec.Command(filepath.Join(s.bin, "pg_config"), "--pkglibdir").Output(); err == nil {
		return strings.TrimSpace(string(out))
	}
	return filepath.Join(s.bin, "..", "lib") // Debian layout: /usr/lib/postgresql/N/{bin,lib}
}

// findBinDir returns the directory holding initdb, pg_ctl and postgres.
func findBinDir() (string, error) {
	if dir := os.Getenv(EnvPgBin); dir != "" {
		if !fileExists(filepath.Join(dir, "initdb")) {
			return "", fmt.Errorf("%s=%s contains no initdb", EnvPgBin, dir)
		}
		return dir, nil
	}
	// pg_config on PATH may come from a client-only package of another
	// version, so its bindir counts only if it has initdb.
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		if dir := strings.TrimSpace(string(out)); fileExists(filepath.Join(dir, "initdb")) {
			return dir, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	best, bestVersion := "", -1
	for _, dir := range dirs {
		version, err := strconv.Atoi(filepath.Base(filepath.Dir(dir)))
		if err == nil && version > bestVersion && fileExists(filepath.Join(dir, "initdb")) {
			best, bestVersion = dir, version
		}
	}
	if best == "" {
		return "", fmt.Errorf("no PostgreSQL server found: no initdb in $%s, `pg_config --bindir` or /usr/lib/postgresql/*/bin", EnvPgBin)
	}
	return best, nil
}

// serverCredential returns the credentials of the "postgres" OS user if we
// are root, since PostgreSQL refuses to run as root, and nil otherwise.
func serverCredential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root, so the server must run as the postgres OS user: %w", err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, err
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, err
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

// onFreePort starts a server (what: "server", "pgbouncer") on a free port:
// configure sets the port and writes the configuration, start starts it and
// returns its log. The port is only free until our listener closes, so
// another process may grab it before the server binds it: then it tries
// another one, startAttempts times at most.
func onFreePort(tb testing.TB, what, dir string, configure func(port int) error, start func() (string, error)) {
	tb.Helper()
	for attempt := 1; ; attempt++ {
		port, err := testkit.FindFreePort()
		if err != nil {
			tb.Fatalf("pgtest: finding a free port: %v", err)
		}
		if err := configure(port); err != nil {
			tb.Fatalf("pgtest: %v", err)
		}
		log, err := start()
		if err == nil {
			return
		}
		if attempt < startAttempts && strings.Contains(log, "Address already in use") {
			continue
		}
		tb.Fatalf("pgtest: starting %s in %s: %v\n%s log:\n%s", what, dir, err, what, tail(log))
	}
}

func fileExists(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && !fi.IsDir()
}

// tail returns the end of a server log, enough to show why it failed.
func tail(log string) string {
	const limit = 4000
	if len(log) > limit {
		return "..." + log[len(log)-limit:]
	}
	return log
}
