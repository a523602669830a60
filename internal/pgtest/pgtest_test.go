//go:build integration

package pgtest

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestQueryThroughConnAndPsql(t *testing.T) {
	t.Parallel()
	srv := Start(t)
	db := srv.CreateDatabase(t, "")
	ctx := t.Context()

	conn := srv.Conn(t, db)
	_, err := conn.Exec(ctx, `CREATE TABLE t (id int PRIMARY KEY, note text);
		INSERT INTO t VALUES (1, 'one'), (2, 'two')`)
	require.NoError(t, err)
	var n int
	require.NoError(t, conn.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n))
	assert.Equal(t, 2, n)

	out := srv.Psql(t, db, "-tAc", "SELECT string_agg(note, ',' ORDER BY id) FROM t")
	assert.Equal(t, "one,two\n", out)

	script := filepath.Join(t.TempDir(), "script.sql")
	require.NoError(t, os.WriteFile(script, []byte(`
		\set QUIET on
		\pset tuples_only on
		\pset format unaligned
		INSERT INTO t VALUES (3, 'three');
		SELECT count(*) FROM t;
	`), 0o644))
	assert.Equal(t, "3\n", srv.PsqlFile(t, db, script))
}

func TestCreateDatabase(t *testing.T) {
	t.Parallel()
	srv := Start(t)
	a, b := srv.CreateDatabase(t, ""), srv.CreateDatabase(t, "")
	assert.NotEqual(t, a, b, "generated names must be unique")

	// Names needing quoting in SQL and escaping in the URL.
	odd := srv.CreateDatabase(t, fmt.Sprintf("Odd name %d/ü", time.Now().UnixNano()))
	var current string
	require.NoError(t, srv.Conn(t, odd).QueryRow(t.Context(), "SELECT current_database()").Scan(&current))
	assert.Equal(t, odd, current)

	// The new database is empty: template0, not template1, was copied.
	assert.Equal(t, "0\n", srv.Psql(t, a, "-tAc",
		"SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"))
}

func TestPasswordAuthentication(t *testing.T) {
	t.Parallel()
	srv := Start(t)
	connect := func(password string) error {
		conn, err := pgx.Connect(t.Context(), fmt.Sprintf("host=%s port=%d user=%s password=%s dbname=postgres sslmode=disable",
			srv.Host, srv.Port, srv.User, password))
		if err == nil {
			conn.Close(t.Context())
		}
		return err
	}
	require.NoError(t, connect(srv.Password))
	require.ErrorContains(t, connect("wrong"), "password authentication failed")
}

// fatalRecorder is a testing.TB whose Fatalf records the message and ends the
// goroutine, like the real one, without failing the test.
type fatalRecorder struct {
	testing.TB
	msg string
}

func (r *fatalRecorder) Fatalf(format string, args ...any) {
	r.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func TestPsqlFailureShowsOutput(t *testing.T) {
	t.Parallel()
	srv := Start(t)
	rec := &fatalRecorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Psql(rec, "", "-c", "SELECT 'before the error'", "-c", "SELECT 1/0", "-c", "SELECT 'not ' || 'reached'")
		rec.msg = "Psql returned"
	}()
	<-done
	assert.Contains(t, rec.msg, "before the error")
	assert.Contains(t, rec.msg, "division by zero")
	assert.NotContains(t, rec.msg, "not reached")
}

func TestStartFailureShowsServerLog(t *testing.T) {
	if os.Getenv(EnvTestDSN) != "" {
		t.Skipf("needs a cluster started by the test, but %s is set", EnvTestDSN)
	}
	t.Parallel()
	rec := &fatalRecorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Start(rec, WithSetting("shared_buffers", "plenty"))
		rec.msg = "Start returned"
	}()
	<-done
	t.Log(rec.msg)
	assert.Contains(t, rec.msg, "pg_ctl start")
	assert.Contains(t, rec.msg, `invalid value for parameter "shared_buffers": "plenty"`)
}

// createPgCron creates pg_cron and schedules a job in the database pg_cron
// runs jobs in ("postgres" unless an external server says otherwise), in a
// transaction that is rolled back so that an external server stays unchanged.
func createPgCron(t *testing.T, srv *Server) error {
	db := "postgres"
	if srv.external {
		db = srv.Psql(t, "", "-tAc", "SELECT coalesce(current_setting('cron.database_name', true), 'postgres')")
		db = strings.TrimSpace(db)
	}
	conn := srv.Conn(t, db)
	tx, err := conn.Begin(t.Context())
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(t.Context()) }()
	if _, err := tx.Exec(t.Context(), "CREATE EXTENSION pg_cron"); err != nil {
		return err
	}
	_, err = tx.Exec(t.Context(), "SELECT cron.schedule('pgtest', '* * * * *', 'SELECT 1')")
	return err
}

func TestPgCron(t *testing.T) {
	t.Parallel()
	srv := Start(t)
	if !srv.external {
		installed := fileExists(filepath.Join(srv.pkgLibDir(), "pg_cron.so"))
		assert.Equal(t, installed, srv.HasPgCron(), "HasPgCron must be true exactly when pg_cron.so is installed")
	}
	err := createPgCron(t, srv)
	if srv.HasPgCron() {
		assert.NoError(t, err)
	} else {
		assert.Error(t, err)
	}
}

func TestWithoutPgCron(t *testing.T) {
	t.Parallel()
	srv := Start(t, WithSetting("shared_preload_libraries", ""))
	assert.False(t, srv.HasPgCron())
	assert.Error(t, createPgCron(t, srv))
}

func TestStopAndStartAgain(t *testing.T) {
	t.Parallel()
	start := time.Now()
	srv := Start(t)
	t.Logf("Start: %v", time.Since(start))
	db := srv.CreateDatabase(t, "")
	ctx := t.Context()
	_, err := srv.Conn(t, db).Exec(ctx, "CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
	require.NoError(t, err)
	port := srv.Port

	start = time.Now()
	srv.Stop(t)
	t.Logf("Stop: %v", time.Since(start))
	_, err = pgx.Connect(ctx, srv.DSN(db))
	require.Error(t, err, "server still accepts connections after Stop")

	start = time.Now()
	srv.StartAgain(t)
	t.Logf("StartAgain after Stop: %v", time.Since(start))
	assert.Equal(t, port, srv.Port)
	assert.Equal(t, "1\n", srv.Psql(t, db, "-tAc", "SELECT count(*) FROM t"))

	// A transaction committed right before a crash survives it.
	_, err = srv.Conn(t, db).Exec(ctx, "INSERT INTO t VALUES (2)")
	require.NoError(t, err)
	start = time.Now()
	srv.StopImmediate(t)
	t.Logf("StopImmediate: %v", time.Since(start))
	start = time.Now()
	srv.StartAgain(t)
	t.Logf("StartAgain after StopImmediate (crash recovery): %v", time.Since(start))
	assert.Equal(t, "2\n", srv.Psql(t, db, "-tAc", "SELECT count(*) FROM t"))
}

func TestTwoServersAtOnce(t *testing.T) {
	t.Parallel()
	a, b := Start(t), Start(t)
	if a.external {
		t.Skipf("both servers are the one from %s", EnvTestDSN)
	}
	assert.NotEqual(t, a.Port, b.Port)
	assert.NotEqual(t, a.dir, b.dir)
	// Both may be copies of one template cluster (initdb): each has the
	// password of its own all the same.
	assert.NotEqual(t, a.Password, b.Password)
	_, err := pgx.Connect(t.Context(), fmt.Sprintf("host=%s port=%d user=%s password=%s dbname=postgres sslmode=disable",
		b.Host, b.Port, b.User, a.Password))
	require.ErrorContains(t, err, "password authentication failed", "b accepts a's password")
	a.Psql(t, "", "-c", "CREATE TABLE only_in_a ()")
	assert.Equal(t, "t\n", a.Psql(t, "", "-tAc", "SELECT to_regclass('only_in_a') IS NOT NULL"))
	assert.Equal(t, "t\n", b.Psql(t, "", "-tAc", "SELECT to_regclass('only_in_a') IS NULL"))
}

func TestCleanupRemovesCluster(t *testing.T) {
	t.Parallel()
	var srv *Server
	t.Run("use", func(t *testing.T) {
		srv = Start(t)
		if srv.external {
			t.Skipf("no cluster to remove with %s set", EnvTestDSN)
		}
		srv.Conn(t, "") // open at cleanup
	})
	if srv.external {
		t.Skip()
	}
	_, err := os.Stat(srv.dir)
	assert.ErrorIs(t, err, os.ErrNotExist)
	_, err = pgx.Connect(t.Context(), srv.DSN(""))
	assert.Error(t, err, "server still accepts connections after cleanup")
}

func TestStandby(t *testing.T) {
	if os.Getenv(EnvTestDSN) != "" {
		t.Skipf("needs a cluster started by the test, but %s is set", EnvTestDSN)
	}
	t.Parallel()
	ctx := t.Context()
	primary := Start(t)
	pconn := primary.Conn(t, "")
	_, err := pconn.Exec(ctx, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
	require.NoError(t, err)

	start := time.Now()
	standby := primary.StartStandby(t)
	t.Logf("StartStandby: %v", time.Since(start))
	assert.NotEqual(t, primary.Port, standby.Port)
	assert.NotEqual(t, primary.dir, standby.dir)
	assert.Equal(t, primary.Password, standby.Password)
	assert.Equal(t, primary.HasPgCron(), standby.HasPgCron())

	assert.Equal(t, "f\n", primary.Psql(t, "", "-tAc", "SELECT pg_is_in_recovery()"))
	assert.Equal(t, "t\n", standby.Psql(t, "", "-tAc", "SELECT pg_is_in_recovery()"))
	// Conn connects over TCP with the password, copied from the primary.
	sconn := standby.Conn(t, "")
	assert.Equal(t, "1\n", standby.Psql(t, "", "-tAc", "SELECT string_agg(id::text, ',') FROM t"),
		"row from before the base backup is missing")

	// Rows committed on the primary later arrive, asynchronously.
	replicated := func(id int) {
		t.Helper()
		_, err := pconn.Exec(ctx, "INSERT INTO t VALUES ($1)", id)
		require.NoError(t, err)
		start := time.Now()
		require.EventuallyWithT(t, func(c *assert.CollectT) {
			var ok bool
			assert.NoError(c, sconn.QueryRow(ctx, "SELECT EXISTS (SELECT FROM t WHERE id = $1)", id).Scan(&ok))
			assert.True(c, ok)
		}, 20*time.Second, 10*time.Millisecond, "row %d not replicated", id)
		t.Logf("row %d replicated after %v", id, time.Since(start))
	}
	replicated(2)

	_, err = sconn.Exec(ctx, "INSERT INTO t VALUES (100)")
	require.ErrorContains(t, err, "cannot execute INSERT in a read-only transaction")

	// The standby can be restarted like any server, and still follows the
	// primary.
	standby.Stop(t)
	start = time.Now()
	standby.StartAgain(t)
	t.Logf("StartAgain of the standby: %v", time.Since(start))
	assert.Equal(t, "t\n", standby.Psql(t, "", "-tAc", "SELECT pg_is_in_recovery()"))
	sconn = standby.Conn(t, "")
	replicated(3)

	primary.Stop(t)
	start = time.Now()
	primary.StartAgain(t)
	t.Logf("StartAgain of the primary: %v", time.Since(start))
	pconn = primary.Conn(t, "")
	replicated(4)
}

// TestExternalServer points PGCONSISTENCY_TEST_DSN at a cluster of its own.
func TestExternalServer(t *testing.T) {
	owned := Start(t)
	t.Setenv(EnvTestDSN, owned.DSN(""))

	var db string
	t.Run("use", func(t *testing.T) {
		srv := Start(t)
		assert.True(t, srv.external)
		assert.Equal(t, owned.Port, srv.Port)
		assert.Equal(t, owned.User, srv.User)
		assert.Equal(t, owned.Password, srv.Password)
		assert.Equal(t, owned.HasPgCron(), srv.HasPgCron())
		db = srv.CreateDatabase(t, "")
		srv.Conn(t, db) // left open: the drop at cleanup must not wait for it
		assert.Equal(t, "1\n", srv.Psql(t, db, "-tAc", "SELECT 1"))
	})
	assert.Equal(t, "0\n", owned.Psql(t, "", "-tAc", "SELECT count(*) FROM pg_database WHERE datname = '"+db+"'"),
		"database was not dropped at cleanup")

	for name, needsCluster := range map[string]func(t *testing.T){
		"Stop":          func(t *testing.T) { Start(t).Stop(t) },
		"StopImmediate": func(t *testing.T) { Start(t).StopImmediate(t) },
		"StartAgain":    func(t *testing.T) { Start(t).StartAgain(t) },
		"StartStandby":  func(t *testing.T) { Start(t).StartStandby(t) },
		"WithSetting":   func(t *testing.T) { Start(t, WithSetting("work_mem", "1MB")) },
	} {
		var sub *testing.T
		t.Run(name, func(t *testing.T) {
			sub = t
			needsCluster(t)
			t.Error("not skipped")
		})
		assert.True(t, sub.Skipped(), "%s did not skip", name)
	}
	// The cluster kept running throughout.
	assert.Equal(t, "1\n", owned.Psql(t, "", "-tAc", "SELECT 1"))
}
