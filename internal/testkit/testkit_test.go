package testkit

import (
	"net"
	"strconv"
	"testing"
)

// TestFreePortNeverTwice: tests running in parallel in one process never
// get the same port, even when the kernel offers a port again as soon as
// it is closed.
func TestFreePortNeverTwice(t *testing.T) {
	seen := map[int]bool{}
	for range 500 {
		port := FreePort(t)
		if seen[port] {
			t.Fatalf("port %d handed out twice", port)
		}
		seen[port] = true
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
		if err != nil {
			t.Fatalf("port %d is not free: %v", port, err)
		}
		l.Close()
	}
}
