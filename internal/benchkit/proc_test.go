package benchkit

import (
	"os"
	"testing"
	"time"
)

func TestOwnProcess(t *testing.T) {
	before := CPU(t, os.Getpid())
	// Burn some CPU so that the reading must move.
	deadline := time.Now().Add(200 * time.Millisecond)
	x := 0
	for time.Now().Before(deadline) {
		x++
	}
	after := CPU(t, os.Getpid())
	if after-before < 50*time.Millisecond {
		t.Errorf("CPU went from %s to %s after 200 ms of busy loop (%d turns)", before, after, x)
	}
	rss, peak := Memory(t, os.Getpid())
	if rss < 1024 || peak < rss {
		t.Errorf("RSS %d KiB, peak %d KiB", rss, peak)
	}
	if _, err := readCPU(-1); err == nil {
		t.Error("CPU(-1): no error")
	}
}
