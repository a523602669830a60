//go:build integration

package bench

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// The writers' phases with -incremental.pin: the writers on one CPU, the
// capture on the other, so that what the capture costs the writers can be
// told apart from the CPU it takes them on a machine of two cores (the
// issue asks how much of the loss that is).
const (
	writersCPU = "0"
	captureCPU = "1"
)

// cpuPin holds the affinities set for the writers' phases: the server's
// postmaster on the writers' CPU, so that every server process forked
// during the phases (pgbench's connections, autovacuum workers, the
// stream's walsender until it is moved) starts there; this process (the
// changes loop's and the stream's client side) on the capture's CPU. The
// server processes that existed before (checkpointer, WAL writer, the
// harness's own connections) keep both.
type cpuPin struct {
	postmaster int
}

// startCPUPin pins as above; conn is a connection of the server's (its
// server process's parent is the postmaster). stop undoes it.
func startCPUPin(tb testing.TB, conn *pgx.Conn) *cpuPin {
	tb.Helper()
	if runtime.NumCPU() < 2 {
		tb.Fatalf("-incremental.pin needs two CPUs, this machine has %d", runtime.NumCPU())
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", conn.PgConn().PID()))
	must(tb, err)
	// pid (comm) state ppid ...: comm may hold spaces, so after its ")".
	fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	postmaster, err := strconv.Atoi(fields[1])
	must(tb, err)
	p := &cpuPin{postmaster: postmaster}
	taskset(tb, "-p", "-c", writersCPU, strconv.Itoa(postmaster))
	taskset(tb, "-a", "-p", "-c", captureCPU, strconv.Itoa(os.Getpid()))
	return p
}

// capture moves server processes of the capture (the changes loop's
// connection, the stream's walsender and store connection) to its CPU.
func (p *cpuPin) capture(tb testing.TB, pids ...uint32) {
	tb.Helper()
	if p == nil {
		return
	}
	for _, pid := range pids {
		taskset(tb, "-p", "-c", captureCPU, strconv.FormatUint(uint64(pid), 10))
	}
}

// writers is the command prefix that runs pgbench on the writers' CPU;
// nil when not pinned.
func (p *cpuPin) writers() []string {
	if p == nil {
		return nil
	}
	return []string{"taskset", "-c", writersCPU}
}

// stop gives the postmaster and this process every CPU again.
func (p *cpuPin) stop(tb testing.TB) {
	tb.Helper()
	if p == nil {
		return
	}
	all := fmt.Sprintf("0-%d", runtime.NumCPU()-1)
	taskset(tb, "-p", "-c", all, strconv.Itoa(p.postmaster))
	taskset(tb, "-a", "-p", "-c", all, strconv.Itoa(os.Getpid()))
}

func taskset(tb testing.TB, args ...string) {
	tb.Helper()
	if out, err := exec.Command("taskset", args...).CombinedOutput(); err != nil {
		tb.Fatalf("taskset %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// TestCPUPin: the pins -incremental.pin relies on hold: a server process
// forked after startCPUPin runs on the writers' CPU, one moved by capture
// and this process on the capture's, and stop gives every CPU back.
func TestCPUPin(t *testing.T) {
	if runtime.NumCPU() < 2 {
		t.Skip("one CPU: nothing to pin apart") // counted as skipped, not passed
	}
	srv := pgtest.Start(t)
	db := srv.CreateDatabase(t, "")
	conn := srv.Conn(t, db)
	allowed := func(pid int) string {
		t.Helper()
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		require.NoError(t, err)
		for _, line := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(line, "Cpus_allowed_list:"); ok {
				return strings.TrimSpace(v)
			}
		}
		t.Fatalf("no Cpus_allowed_list in /proc/%d/status", pid)
		return ""
	}
	all := allowed(os.Getpid())
	pin := startCPUPin(t, conn)
	defer pin.stop(t)        // again after the one below: it only gives every CPU back
	later := srv.Conn(t, db) // forked after the pin
	moved := srv.Conn(t, db)
	pin.capture(t, moved.PgConn().PID())
	assert.Equal(t, writersCPU, allowed(pin.postmaster), "the postmaster")
	assert.Equal(t, writersCPU, allowed(int(later.PgConn().PID())), "a server process forked after the pin")
	assert.Equal(t, captureCPU, allowed(int(moved.PgConn().PID())), "a server process moved to the capture's CPU")
	assert.Equal(t, captureCPU, allowed(os.Getpid()), "this process")
	pin.stop(t)
	assert.Equal(t, all, allowed(pin.postmaster), "the postmaster after stop")
	assert.Equal(t, all, allowed(os.Getpid()), "this process after stop")
}
