// Package testkit holds the helpers the tests of every tier share and that
// need no PostgreSQL: the repository root, a free TCP port, and a reader of
// the Prometheus text exposition format (the collector's /metrics pages).
// Helpers that start servers live in internal/pgtest and internal/fixture,
// which only the integration and e2e tiers compile.
package testkit

import (
	"errors"
	"net"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
)

// Root is the repository root.
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// Path returns the path of a file given relative to the repository root.
func Path(rel string) string { return filepath.Join(Root(), rel) }

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago; it
// fails the test if none can be had. The port is free only until the caller
// binds it: a server that may lose the race retries (internal/pgtest does).
func FreePort(tb testing.TB) int {
	tb.Helper()
	port, err := FindFreePort()
	if err != nil {
		tb.Fatalf("finding a free port: %v", err)
	}
	return port
}

// FindFreePort is FreePort for code without a testing.TB at hand. It never
// returns a port twice in one process: the kernel may hand a port that was
// just closed out again, and tests running in parallel would then race for
// it (a server started on the first one may not have bound it yet).
func FindFreePort() (int, error) {
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		port := l.Addr().(*net.TCPAddr).Port
		if err := l.Close(); err != nil {
			return 0, err
		}
		handedOut.Lock()
		seen := handedOut.ports[port]
		handedOut.ports[port] = true
		handedOut.Unlock()
		if !seen {
			return port, nil
		}
	}
	return 0, errors.New("no free port that was not handed out before in 100 tries")
}

// handedOut are the ports FindFreePort returned.
var handedOut = struct {
	sync.Mutex
	ports map[int]bool
}{ports: map[int]bool{}}
