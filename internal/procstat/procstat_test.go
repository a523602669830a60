package procstat

import (
	"os"
	"testing"
	"time"
)

func TestOwnProcess(t *testing.T) {
	before, err := CPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// Burn some CPU so that the reading must move.
	deadline := time.Now().Add(200 * time.Millisecond)
	x := 0
	for time.Now().Before(deadline) {
		x++
	}
	after, err := CPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if after-before < 50*time.Millisecond {
		t.Errorf("CPU went from %s to %s after 200 ms of busy loop (%d turns)", before, after, x)
	}
	rss, peak, err := Memory(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if rss < 1024 || peak < rss {
		t.Errorf("RSS %d KiB, peak %d KiB", rss, peak)
	}
	if _, err := CPU(-1); err == nil {
		t.Error("CPU(-1): no error")
	}
}
