//go:build integration

package pgtest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// connectVia connects through b as user. Unnamed prepared statements only
// (QueryExecModeExec): with transaction pooling a named one may be prepared
// on one server connection and executed on another. If edit is not nil it
// may change the configuration first. The connection is closed at cleanup.
func connectVia(t *testing.T, b *PgBouncer, user, password string, edit func(*pgx.ConnConfig)) (*pgx.Conn, error) {
	t.Helper()
	cfg, err := pgx.ParseConfig(b.DSN(user, password))
	require.NoError(t, err)
	cfg.DefaultQueryExecMode = pgx.QueryExecModeExec
	if edit != nil {
		edit(cfg)
	}
	conn, err := pgx.ConnectConfig(t.Context(), cfg)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn.Close(ctx)
	})
	return conn, nil
}

// show runs a SHOW command on the admin console and returns its rows, each
// value formatted with fmt.Sprint.
func show(t *testing.T, admin *pgx.Conn, what string) []map[string]string {
	t.Helper()
	rows, err := admin.Query(t.Context(), "SHOW "+what)
	require.NoError(t, err)
	maps, err := pgx.CollectRows(rows, pgx.RowToMap)
	require.NoError(t, err, "SHOW %s", what)
	out := make([]map[string]string, len(maps))
	for i, m := range maps {
		out[i] = make(map[string]string, len(m))
		for k, v := range m {
			out[i][k] = fmt.Sprint(v)
		}
	}
	return out
}

// pool returns the SHOW POOLS row of database db and user, nil if none.
func pool(t *testing.T, admin *pgx.Conn, db, user string) map[string]string {
	t.Helper()
	for _, row := range show(t, admin, "POOLS") {
		if row["database"] == db && row["user"] == user {
			return row
		}
	}
	return nil
}

func TestPgBouncerUsersAndAdminConsole(t *testing.T) {
	t.Parallel()
	srv := Start(t)
	db := srv.CreateDatabase(t, "")
	role, password := srv.CreateLoginRole(t, db, "bouncer_")
	start := time.Now()
	b := srv.StartPgBouncer(t, db)
	t.Logf("StartPgBouncer: %v", time.Since(start))
	ctx := t.Context()

	conn, err := connectVia(t, b, srv.User, srv.Password, nil)
	require.NoError(t, err, "superuser through pgbouncer\n%s", b.Log())
	var user, database string
	require.NoError(t, conn.QueryRow(ctx, "SELECT current_user, current_database()").Scan(&user, &database))
	assert.Equal(t, srv.User, user)
	assert.Equal(t, db, database)

	// pgbouncer tells the client no more than for a wrong password; its
	// log says why.
	_, err = connectVia(t, b, role, password, nil)
	require.ErrorContains(t, err, "SASL authentication failed", "a role not added with AddUser")
	assert.Contains(t, b.Log(), "no such user: "+role)

	b.AddUser(t, role, password)
	conn, err = connectVia(t, b, role, password, nil)
	require.NoError(t, err, "role added with AddUser\n%s", b.Log())
	require.NoError(t, conn.QueryRow(ctx, "SELECT current_user").Scan(&user))
	assert.Equal(t, role, user)
	_, err = connectVia(t, b, role, "wrong", nil)
	require.ErrorContains(t, err, "SASL authentication failed")

	admin := b.AdminConn(t)
	config := map[string]string{}
	for _, row := range show(t, admin, "CONFIG") {
		config[row["key"]] = row["value"]
	}
	assert.Equal(t, "transaction", config["pool_mode"])
	assert.Equal(t, "2", config["default_pool_size"])
	assert.Equal(t, "2", config["max_db_connections"])
	assert.Equal(t, "scram-sha-256", config["auth_type"])
	assert.Equal(t, srv.User, config["admin_users"])
	assert.Empty(t, config["ignore_startup_parameters"])
	assert.Equal(t, strconv.Itoa(b.Port), config["listen_port"])

	for _, u := range []string{srv.User, role} {
		p := pool(t, admin, db, u)
		if assert.NotNil(t, p, "no pool of %s in SHOW POOLS", u) {
			assert.Equal(t, "transaction", p["pool_mode"])
		}
	}
}

func TestPgBouncerRefusesStartupParameters(t *testing.T) {
	t.Parallel()
	srv := Start(t)
	db := srv.CreateDatabase(t, "")
	b := srv.StartPgBouncer(t, db)

	for name, value := range map[string]string{
		"statement_timeout":             "1000",
		"default_transaction_read_only": "on",
	} {
		_, err := connectVia(t, b, srv.User, srv.Password, func(c *pgx.ConnConfig) {
			c.RuntimeParams[name] = value
		})
		require.ErrorContains(t, err, "unsupported startup parameter", name)
		assert.ErrorContains(t, err, name)

		// The server itself takes it: the refusal is pgbouncer's.
		cfg, err := pgx.ParseConfig(srv.DSN(db))
		require.NoError(t, err)
		cfg.RuntimeParams[name] = value
		direct, err := pgx.ConnectConfig(t.Context(), cfg)
		require.NoError(t, err, "%s straight to the server", name)
		direct.Close(t.Context())
	}

	// application_name is one of the few it accepts, and passes on.
	conn, err := connectVia(t, b, srv.User, srv.Password, func(c *pgx.ConnConfig) {
		c.RuntimeParams["application_name"] = "pgtest-bouncer"
	})
	require.NoError(t, err, "application_name through pgbouncer")
	var name string
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT current_setting('application_name')").Scan(&name))
	assert.Equal(t, "pgtest-bouncer", name)
}

func TestPgBouncerPoolSize(t *testing.T) {
	t.Parallel()
	srv := Start(t)
	db := srv.CreateDatabase(t, "")
	b := srv.StartPgBouncer(t, db, WithPoolSize(2))
	ctx := t.Context()
	admin := b.AdminConn(t)
	direct := srv.Conn(t, db)
	serverConns := func() int {
		t.Helper()
		var n int
		require.NoError(t, direct.QueryRow(ctx, `
			SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid()`).Scan(&n))
		return n
	}

	// Two clients hold a server connection each with an open transaction.
	var holders []pgx.Tx
	pids := map[int]bool{}
	for range 2 {
		conn, err := connectVia(t, b, srv.User, srv.Password, nil)
		require.NoError(t, err)
		tx, err := conn.Begin(ctx)
		require.NoError(t, err)
		var pid int
		require.NoError(t, tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&pid))
		holders = append(holders, tx)
		pids[pid] = true
	}
	require.Len(t, pids, 2, "the open transactions share a server connection")

	// A third client's transaction waits for one of them.
	third, err := connectVia(t, b, srv.User, srv.Password, nil)
	require.NoError(t, err)
	type result struct {
		pid int
		err error
	}
	done := make(chan result, 1)
	go func() {
		var r result
		r.err = pgx.BeginFunc(ctx, third, func(tx pgx.Tx) error {
			return tx.QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&r.pid)
		})
		done <- r
	}()
	require.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.Equal(c, "1", pool(t, admin, db, srv.User)["cl_waiting"])
	}, 10*time.Second, 10*time.Millisecond, "the third client is not waiting")
	for range 10 {
		select {
		case r := <-done:
			t.Fatalf("the third transaction ran while the pool was full: %+v", r)
		case <-time.After(30 * time.Millisecond):
		}
		assert.LessOrEqual(t, serverConns(), 2, "more server connections than the pool size")
	}
	assert.Equal(t, 2, serverConns())

	// It gets the connection the first transaction gives back.
	var first int
	require.NoError(t, holders[0].QueryRow(ctx, "SELECT pg_backend_pid()").Scan(&first))
	require.NoError(t, holders[0].Commit(ctx))
	select {
	case r := <-done:
		require.NoError(t, r.err)
		assert.Equal(t, first, r.pid)
	case <-time.After(10 * time.Second):
		t.Fatal("the third transaction still waits after a server connection was released")
	}
	assert.Equal(t, 2, serverConns())
	require.NoError(t, holders[1].Rollback(ctx))
}

func TestPgBouncerStopAndStartAgain(t *testing.T) {
	t.Parallel()
	srv := Start(t)
	db := srv.CreateDatabase(t, "")
	b := srv.StartPgBouncer(t, db)
	ctx := t.Context()
	conn, err := connectVia(t, b, srv.User, srv.Password, nil)
	require.NoError(t, err)
	port := b.Port

	start := time.Now()
	b.Stop(t)
	t.Logf("Stop: %v", time.Since(start))
	_, err = conn.Exec(ctx, "SELECT 1")
	assert.Error(t, err, "a connection through pgbouncer survived Stop")
	_, err = connectVia(t, b, srv.User, srv.Password, nil)
	require.Error(t, err, "pgbouncer still accepts connections after Stop")
	b.Stop(t) // stopping a stopped pgbouncer is a no-op

	start = time.Now()
	b.StartAgain(t)
	t.Logf("StartAgain: %v", time.Since(start))
	assert.Equal(t, port, b.Port)
	conn, err = connectVia(t, b, srv.User, srv.Password, nil)
	require.NoError(t, err, "after StartAgain\n%s", b.Log())
	var one int
	require.NoError(t, conn.QueryRow(ctx, "SELECT 1").Scan(&one))
	assert.Contains(t, b.Log(), "process up: PgBouncer")
}

func TestPgBouncerCleanup(t *testing.T) {
	t.Parallel()
	srv := Start(t)
	var b *PgBouncer
	var pid int
	t.Run("use", func(t *testing.T) {
		b = srv.StartPgBouncer(t, "")
		pid = b.proc.cmd.Process.Pid
		_, err := connectVia(t, b, srv.User, srv.Password, nil) // open at cleanup
		require.NoError(t, err)
	})
	_, err := os.Stat(b.dir)
	assert.ErrorIs(t, err, os.ErrNotExist)
	assert.False(t, running(pid), "pgbouncer still running after cleanup")
}

// envBouncerHelper makes the test binary run TestPgBouncerHelperProcess.
const envBouncerHelper = "PGTEST_BOUNCER_HELPER"

// TestPgBouncerHelperProcess starts a pgbouncer in front of the server of
// $PGCONSISTENCY_TEST_DSN, prints its pid and directory and waits to be
// killed. Run by TestPgBouncerDiesWithTestBinary.
func TestPgBouncerHelperProcess(t *testing.T) {
	if os.Getenv(envBouncerHelper) == "" {
		t.Skip("run by TestPgBouncerDiesWithTestBinary")
	}
	b := Start(t).StartPgBouncer(t, "")
	fmt.Printf("pgbouncer %d %s\n", b.proc.cmd.Process.Pid, b.dir)
	time.Sleep(time.Minute)
	t.Error("not killed")
}

func TestPgBouncerDiesWithTestBinary(t *testing.T) {
	t.Parallel()
	srv := Start(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestPgBouncerHelperProcess$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), envBouncerHelper+"=1", EnvTestDSN+"="+srv.DSN(""))
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })

	var pid int
	var dir string
	lines := bufio.NewScanner(stdout)
	for lines.Scan() {
		if _, err := fmt.Sscanf(lines.Text(), "pgbouncer %d %s", &pid, &dir); err == nil {
			break
		}
	}
	require.NotZero(t, pid, "the helper process printed no pgbouncer pid")
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.True(t, strings.Contains(dir, "pgbouncer-"), dir)
	require.True(t, running(pid), "pgbouncer not running")

	require.NoError(t, cmd.Process.Kill())
	err = cmd.Wait()
	var exit *exec.ExitError
	require.True(t, errors.As(err, &exit), "%v", err)
	require.Eventually(t, func() bool { return !running(pid) },
		10*time.Second, 10*time.Millisecond, "pgbouncer %d outlived the test binary", pid)
}

// running reports whether process pid exists and is not a zombie (one whose
// parent died is left to whatever reaps orphans here, maybe nobody).
func running(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) state ...; comm may contain spaces and parentheses.
	rest := string(stat[strings.LastIndexByte(string(stat), ')')+1:])
	return !strings.HasPrefix(strings.TrimSpace(rest), "Z")
}
