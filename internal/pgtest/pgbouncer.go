//go:build integration || e2e

package pgtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// bouncerReadyTimeout bounds how long StartPgBouncer and StartAgain wait for
// pgbouncer to serve a query.
const bouncerReadyTimeout = 30 * time.Second

// bouncerStopTimeout is how long Stop waits after SIGTERM before SIGKILL.
const bouncerStopTimeout = 10 * time.Second

// PgBouncer is a running pgbouncer in front of one database of a Server.
//
// Stop and StartAgain must not be called concurrently with other methods;
// all other methods are safe for concurrent use.
type PgBouncer struct {
	Host     string // 127.0.0.1
	Port     int
	Database string // the one database clients can reach, besides the admin console "pgbouncer"

	server   *Server
	dir      string // temporary directory: configuration, auth file, pid file, log
	bin      string // pgbouncer executable
	cred     *syscall.Credential
	poolSize int

	mu    sync.Mutex  // guards users and the auth file
	users [][2]string // name, password

	proc *bouncerProcess // nil while stopped
}

// BouncerOption configures StartPgBouncer.
type BouncerOption func(*bouncerOptions)

type bouncerOptions struct {
	poolSize int
}

// WithPoolSize sets default_pool_size and max_db_connections to n: at most n
// server connections to the database, whichever users the clients log in as.
// The default is 2.
func WithPoolSize(n int) BouncerOption {
	return func(o *bouncerOptions) { o.poolSize = n }
}

// StartPgBouncer starts a pgbouncer in front of database db of s (the
// server's default database if empty), in pool_mode transaction and with
// pgbouncer's defaults otherwise, on a free 127.0.0.1 port. Clients
// authenticate with scram-sha-256; the server's superuser is allowed in and
// is the admin of the console (database "pgbouncer"), AddUser allows others.
// pgbouncer connects to the server over TCP with the client's user name and
// password. A tb.Cleanup stops it and removes its directory.
func (s *Server) StartPgBouncer(tb testing.TB, db string, opts ...BouncerOption) *PgBouncer {
	tb.Helper()
	o := bouncerOptions{poolSize: 2}
	for _, opt := range opts {
		opt(&o)
	}
	if o.poolSize < 1 {
		tb.Fatalf("pgtest: WithPoolSize(%d): expected at least 1", o.poolSize)
	}
	if db == "" {
		db = strings.TrimPrefix(s.url.Path, "/")
	}
	if db == "" {
		db = s.User // as for a client, whose database defaults to its user name
	}
	if db == "pgbouncer" {
		tb.Fatalf(`pgtest: StartPgBouncer: the database name "pgbouncer" is reserved for pgbouncer's admin console`)
	}
	bin, err := findPgBouncer()
	if err != nil {
		tb.Fatalf("pgtest: %v. Run `make test` as root (it installs pgbouncer)", err)
	}
	// Not s.cred: a server from $PGCONSISTENCY_TEST_DSN has none, but
	// pgbouncer refuses root all the same.
	cred, err := serverCredential()
	if err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	parent := ""
	if cred != nil {
		parent = "/tmp" // reachable by the postgres user
	}
	dir, err := os.MkdirTemp(parent, "pgbouncer-")
	if err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	b := &PgBouncer{
		Host:     "127.0.0.1",
		Database: db,
		server:   s,
		dir:      dir,
		bin:      bin,
		cred:     cred,
		poolSize: o.poolSize,
		users:    [][2]string{{s.User, s.Password}},
	}
	// Registered first, so that a failed start is cleaned up too.
	tb.Cleanup(func() { b.destroy(tb) })
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			tb.Fatalf("pgtest: %v", err)
		}
	}
	if err := b.writeAuthFile(); err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	onFreePort(tb, "pgbouncer", b.dir, func(port int) error {
		b.Port = port
		return b.writeFile(b.configPath(), b.config())
	}, b.start)
	return b
}

// config returns pgbouncer.ini.
func (b *PgBouncer) config() string {
	settings := [][2]string{
		{"listen_addr", b.Host},
		{"listen_port", strconv.Itoa(b.Port)},
		// No unix socket: with one, pgbouncer keeps running when the TCP
		// port was taken meanwhile, instead of exiting so that we can
		// retry on another port.
		{"unix_socket_dir", ""},
		{"pidfile", filepath.Join(b.dir, "pgbouncer.pid")},
		// No logfile: pgbouncer logs to stderr anyway, which goes to
		// pgbouncer.log along with what it says before reading this file.
		{"auth_type", "scram-sha-256"},
		{"auth_file", b.authFilePath()},
		{"admin_users", b.server.User},
		{"pool_mode", "transaction"},
		{"default_pool_size", strconv.Itoa(b.poolSize)},
		{"max_db_connections", strconv.Itoa(b.poolSize)},
		{"max_client_conn", "100"},
	}
	var c strings.Builder
	// No dbname: it defaults to the client-side name, so the name needs no
	// quoting as a value, only as a key.
	fmt.Fprintf(&c, "[databases]\n%s = host=%s port=%d\n\n[pgbouncer]\n",
		quoteBouncerName(b.Database), b.server.Host, b.server.Port)
	for _, kv := range settings {
		fmt.Fprintf(&c, "%s = %s\n", kv[0], kv[1])
	}
	return c.String()
}

// quoteBouncerName quotes a database name for a key of [databases] if it
// has characters other than those pgbouncer accepts unquoted.
func quoteBouncerName(name string) string {
	for _, r := range name {
		if !(r == '_' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') { //nolint:staticcheck // QF1001: the allowed characters read best as a list
			return `"` + strings.ReplaceAll(name, `"`, `""`) + `"`
		}
	}
	return name
}

// writeAuthFile writes the auth file with b.users; b.mu must be held or b
// not yet shared. Plain-text passwords: pgbouncer needs them (or the
// server's SCRAM secrets) to log in to the server as the client's user.
func (b *PgBouncer) writeAuthFile() error {
	quote := func(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }
	var c strings.Builder
	for _, u := range b.users {
		c.WriteString(quote(u[0]) + " " + quote(u[1]) + "\n")
	}
	return b.writeFile(b.authFilePath(), c.String())
}

// AddUser allows user name with password through the pooler, e.g. a role
// from Server.CreateLoginRole: it adds them to the auth file and, if
// pgbouncer is running, reloads it from the admin console.
func (b *PgBouncer) AddUser(tb testing.TB, name, password string) {
	tb.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	b.users = append(b.users, [2]string{name, password})
	if err := b.writeAuthFile(); err != nil {
		tb.Fatalf("pgtest: %v", err)
	}
	if b.proc == nil {
		return // read at the next start
	}
	// RELOAD rather than SIGHUP: it returns once the files are read again.
	conn, err := b.adminConn(tb.Context())
	if err != nil {
		tb.Fatalf("pgtest: connecting to the pgbouncer admin console: %v\npgbouncer log:\n%s", err, tail(b.Log()))
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(tb.Context(), "RELOAD"); err != nil {
		tb.Fatalf("pgtest: pgbouncer RELOAD: %v\npgbouncer log:\n%s", err, tail(b.Log()))
	}
}

// DSN returns a postgres:// URL of the pooled database through pgbouncer,
// for user with password.
func (b *PgBouncer) DSN(user, password string) string {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(user, password),
		Host:     net.JoinHostPort(b.Host, strconv.Itoa(b.Port)),
		Path:     "/" + b.Database,
		RawQuery: "sslmode=disable", // pgbouncer has no certificate either
	}
	return u.String()
}

// AdminConn returns a connection to pgbouncer's admin console (database
// "pgbouncer") as the server's superuser, for SHOW POOLS, SHOW SERVERS and
// the like; it is closed at cleanup. It uses the simple query protocol, the
// only one the console speaks.
func (b *PgBouncer) AdminConn(tb testing.TB) *pgx.Conn {
	tb.Helper()
	conn, err := b.adminConn(tb.Context())
	if err != nil {
		tb.Fatalf("pgtest: connecting to the pgbouncer admin console: %v\npgbouncer log:\n%s", err, tail(b.Log()))
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn.Close(ctx)
	})
	return conn
}

func (b *PgBouncer) adminConn(ctx context.Context) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(b.DSN(b.server.User, b.server.Password))
	if err != nil {
		return nil, err
	}
	cfg.Database = "pgbouncer"
	cfg.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	return pgx.ConnectConfig(ctx, cfg)
}

// Log returns what pgbouncer logged since StartPgBouncer, for failure
// messages.
func (b *PgBouncer) Log() string {
	out, err := os.ReadFile(b.logPath())
	if err != nil {
		return fmt.Sprintf("(reading %s: %v)", b.logPath(), err)
	}
	return string(out)
}

// Stop shuts pgbouncer down at once (SIGTERM, pgbouncer 1.18's immediate
// shutdown), breaking client connections, and waits for it to exit.
func (b *PgBouncer) Stop(tb testing.TB) {
	tb.Helper()
	if err := b.stop(); err != nil {
		tb.Fatalf("pgtest: stopping pgbouncer in %s: %v\npgbouncer log:\n%s", b.dir, err, tail(b.Log()))
	}
}

// StartAgain starts a stopped pgbouncer on the same port. It fails the test
// if something else took the port in the meantime.
func (b *PgBouncer) StartAgain(tb testing.TB) {
	tb.Helper()
	if b.proc != nil {
		tb.Fatalf("pgtest: StartAgain: pgbouncer in %s is running", b.dir)
	}
	if log, err := b.start(); err != nil {
		tb.Fatalf("pgtest: restarting pgbouncer in %s: %v\npgbouncer log:\n%s", b.dir, err, tail(log))
	}
}

// bouncerProcess is a running pgbouncer.
type bouncerProcess struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once it exited
	err  error         // from Wait, set before done is closed
}

// start runs pgbouncer and waits until a query through it succeeds. If it
// does not, start stops it and returns what it logged meanwhile.
func (b *PgBouncer) start() (log string, err error) {
	logFile, err := os.OpenFile(b.logPath(), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return "", err
	}
	defer logFile.Close() // the child has its own descriptor
	offset, err := logFile.Seek(0, io.SeekEnd)
	if err != nil {
		return "", err
	}
	since := func() string {
		f, err := os.Open(b.logPath())
		if err != nil {
			return fmt.Sprintf("(%v)", err)
		}
		defer f.Close()
		out, _ := io.ReadAll(io.NewSectionReader(f, offset, 1<<62))
		return string(out)
	}

	cmd := exec.Command(b.bin, b.configPath())
	cmd.Dir = b.dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: b.cred,
		// Out of the test's process group: Ctrl-C in a terminal goes to the
		// test binary, whose cleanup stops pgbouncer.
		Setpgid: true,
		// Killed if the test binary dies without cleaning up.
		Pdeathsig: syscall.SIGKILL,
	}
	p := &bouncerProcess{cmd: cmd, done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		// The parent-death signal is sent when the thread that started the
		// child exits, not the process, and Go may end idle threads. So
		// this goroutine keeps its thread until pgbouncer has exited, and
		// returns without unlocking, which ends the thread.
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return "", fmt.Errorf("starting %s: %w", b.bin, err)
	}
	b.proc = p

	if err := b.waitReady(); err != nil {
		err = errors.Join(err, b.stop())
		return since(), err
	}
	return "", nil
}

// waitReady waits until a query through pgbouncer succeeds, or pgbouncer
// exits, or bouncerReadyTimeout passes.
func (b *PgBouncer) waitReady() error {
	ctx, cancel := context.WithTimeout(context.Background(), bouncerReadyTimeout)
	defer cancel()
	var last error
	for {
		select {
		case <-b.proc.done:
			return fmt.Errorf("pgbouncer exited: %w", b.proc.err)
		default:
		}
		last = b.ping(ctx)
		if last == nil {
			return nil
		}
		select {
		case <-b.proc.done:
			return fmt.Errorf("pgbouncer exited: %w", b.proc.err)
		case <-ctx.Done():
			return fmt.Errorf("pgbouncer not ready after %v: %w", bouncerReadyTimeout, last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// ping runs SELECT 1 through pgbouncer on the pooled database.
func (b *PgBouncer) ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, b.DSN(b.server.User, b.server.Password))
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, "SELECT 1")
	return err
}

// stop ends pgbouncer if it runs: SIGTERM, then SIGKILL if it is still
// there after bouncerStopTimeout.
func (b *PgBouncer) stop() error {
	p := b.proc
	if p == nil {
		return nil
	}
	b.proc = nil
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(bouncerStopTimeout):
	}
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	<-p.done
	return fmt.Errorf("pgbouncer did not exit within %v of SIGTERM; killed it", bouncerStopTimeout)
}

// destroy stops pgbouncer if it runs and removes its directory.
func (b *PgBouncer) destroy(tb testing.TB) {
	if err := b.stop(); err != nil {
		tb.Errorf("pgtest: stopping pgbouncer in %s: %v", b.dir, err)
	}
	if err := os.RemoveAll(b.dir); err != nil {
		tb.Errorf("pgtest: %v", err)
	}
}

func (b *PgBouncer) configPath() string   { return filepath.Join(b.dir, "pgbouncer.ini") }
func (b *PgBouncer) authFilePath() string { return filepath.Join(b.dir, "userlist.txt") }
func (b *PgBouncer) logPath() string      { return filepath.Join(b.dir, "pgbouncer.log") }

// writeFile creates a file that only pgbouncer's OS user can read.
func (b *PgBouncer) writeFile(path, content string) error {
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		return err
	}
	if b.cred != nil {
		return os.Chown(path, int(b.cred.Uid), int(b.cred.Gid))
	}
	return nil
}

// findPgBouncer returns the pgbouncer executable: on $PATH, or where Debian
// puts it (/usr/sbin, not on every user's $PATH).
func findPgBouncer() (string, error) {
	if p, err := exec.LookPath("pgbouncer"); err == nil {
		return p, nil
	}
	if fileExists("/usr/sbin/pgbouncer") {
		return "/usr/sbin/pgbouncer", nil
	}
	return "", errors.New("pgbouncer not found on $PATH or in /usr/sbin")
}
