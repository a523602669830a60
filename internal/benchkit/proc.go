// Package benchkit holds what the benchmark harnesses of make bench
// (internal/bench) and make soak (internal/soak) share: CPU time and memory
// of a process from Linux's /proc, the receiver's BenchmarkScrape run against
// a database, and cheap extra invariants to register.
package benchkit

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// clockTick is the unit of utime and stime in /proc/<pid>/stat (USER_HZ,
// 100 on Linux).
const clockTick = 10 * time.Millisecond

// CPU is the user plus system CPU time the process has used so far; it
// fails the test if /proc cannot tell.
func CPU(tb testing.TB, pid int) time.Duration {
	tb.Helper()
	d, err := readCPU(pid)
	if err != nil {
		tb.Fatal(err)
	}
	return d
}

// Memory returns the resident set size (VmRSS) and its peak (VmHWM) of the
// process, in KiB; it fails the test if /proc cannot tell.
func Memory(tb testing.TB, pid int) (rssKiB, peakKiB int64) {
	tb.Helper()
	rss, peak, err := readMemory(pid)
	if err != nil {
		tb.Fatal(err)
	}
	return rss, peak
}

func readCPU(pid int) (time.Duration, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// After the command name in parentheses (which may hold spaces), utime
	// and stime are the 12th and 13th fields.
	end := strings.LastIndexByte(string(data), ')')
	if end < 0 || end+2 > len(data) {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(string(data[end+2:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields after the command name", pid, len(f))
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: utime %q, stime %q", pid, f[11], f[12])
	}
	return time.Duration(utime+stime) * clockTick, nil
}

func readMemory(pid int) (rssKiB, peakKiB int64, err error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			rssKiB, _ = strconv.ParseInt(f[1], 10, 64)
		case "VmHWM:":
			peakKiB, _ = strconv.ParseInt(f[1], 10, 64)
		}
	}
	if rssKiB == 0 {
		return 0, 0, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
	}
	return rssKiB, peakKiB, nil
}
