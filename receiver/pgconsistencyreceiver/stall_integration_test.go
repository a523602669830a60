//go:build integration

package pgconsistencyreceiver

import (
	"fmt"
	"net"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/collector/consumer/consumertest"
	"go.opentelemetry.io/collector/pdata/pmetric"

	"github.com/pgconsistency/pgconsistency/internal/fixture"
	"github.com/pgconsistency/pgconsistency/internal/pgtest"
)

// stallProxy forwards TCP connections to a server until stall is called.
// From then on it forwards nothing, in either direction, on the connections
// it has and on those it accepts, and closes nothing: to both ends the
// network looks like it went silent (a dead route, a firewall dropping
// packets). Connections stalled once stay silent for good; after resume, new
// connections are forwarded again. When one end closes its side, the proxy
// closes the other, as the kernel would when the route comes back.
type stallProxy struct {
	ln     net.Listener
	target string

	mu      sync.Mutex
	stalled bool
	pairs   map[*proxyPair]struct{}
	wg      sync.WaitGroup
}

type proxyPair struct {
	client, server net.Conn
	silent         atomic.Bool // once set, bytes read are dropped instead of forwarded
	closeOnce      sync.Once
}

func (p *proxyPair) close() {
	p.closeOnce.Do(func() {
		_ = p.client.Close()
		_ = p.server.Close()
	})
}

func startStallProxy(t *testing.T, target string) *stallProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &stallProxy{ln: ln, target: target, pairs: map[*proxyPair]struct{}{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *stallProxy) addr() string { return p.ln.Addr().String() }

func (p *stallProxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return // listener closed
		}
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			_ = client.Close()
			continue
		}
		pair := &proxyPair{client: client, server: server}
		p.mu.Lock()
		pair.silent.Store(p.stalled)
		p.pairs[pair] = struct{}{}
		p.wg.Add(2)
		p.mu.Unlock()
		go p.pipe(pair, client, server)
		go p.pipe(pair, server, client)
	}
}

// pipe copies src to dst while the pair is not silent. It keeps reading
// while silent, so that it sees when src is closed, and drops what it reads.
func (p *stallProxy) pipe(pair *proxyPair, src, dst net.Conn) {
	defer p.wg.Done()
	defer func() {
		pair.close()
		p.mu.Lock()
		delete(p.pairs, pair)
		p.mu.Unlock()
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !pair.silent.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// stall silences every connection, present and future, until resume.
func (p *stallProxy) stall() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stalled = true
	for pair := range p.pairs {
		pair.silent.Store(true)
	}
}

// resume forwards new connections again; stalled ones stay silent.
func (p *stallProxy) resume() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stalled = false
}

// openPairs is the number of proxied connections still open.
func (p *stallProxy) openPairs() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pairs)
}

// describe lists the open connections, for failure messages.
func (p *stallProxy) describe() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var b strings.Builder
	for pair := range p.pairs {
		fmt.Fprintf(&b, "[%s silent=%v] ", pair.client.RemoteAddr(), pair.silent.Load())
	}
	return b.String()
}

func (p *stallProxy) close() {
	_ = p.ln.Close()
	p.mu.Lock()
	for pair := range p.pairs {
		pair.close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// upPoint is one scrape's pgconsistency.up: when the scrape started, and the value.
type upPoint struct {
	at time.Time
	up int64
}

// upPoints returns pgconsistency.up of every scrape in the sink, in order.
func upPoints(sink *consumertest.MetricsSink) []upPoint {
	var points []upPoint
	for _, md := range sink.AllMetrics() {
		for i := 0; i < md.ResourceMetrics().Len(); i++ {
			sms := md.ResourceMetrics().At(i).ScopeMetrics()
			for j := 0; j < sms.Len(); j++ {
				ms := sms.At(j).Metrics()
				for k := 0; k < ms.Len(); k++ {
					if ms.At(k).Name() != "pgconsistency.up" {
						continue
					}
					dps := ms.At(k).Gauge().DataPoints()
					for d := 0; d < dps.Len(); d++ {
						dp := dps.At(d)
						v := dp.IntValue()
						if dp.ValueType() == pmetric.NumberDataPointValueTypeDouble {
							v = int64(dp.DoubleValue())
						}
						points = append(points, upPoint{at: dp.Timestamp().AsTime(), up: v})
					}
				}
			}
		}
	}
	return points
}

// pollUntil checks cond every 100 ms until it holds or the deadline passes,
// and returns the last value it saw.
func pollUntil(deadline time.Duration, value func() int, cond func(int) bool) int {
	end := time.Now().Add(deadline)
	for {
		v := value()
		if cond(v) || time.Now().After(end) {
			return v
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestStallNetworkSilence: the network between the receiver and PostgreSQL
// goes silent (no byte passes, no connection is closed or refused). Every
// scrape must still end within its timeout and report up = 0, at the
// interval's cadence; when the network comes back the counts return without
// a restart, and neither goroutines nor server connections are left behind.
func TestStallNetworkSilence(t *testing.T) {
	t.Parallel()
	const (
		interval = 500 * time.Millisecond
		timeout  = 300 * time.Millisecond
		// Scheduling delay on a loaded 2-core machine. A scrape stuck on a
		// silent socket would last until TCP gives up: minutes, not this.
		slack    = time.Second
		maxGap   = interval + timeout + slack
		stallFor = 3500 * time.Millisecond
	)
	srv := pgtest.Start(t)
	db := fixture.NewDatabase(t, srv, "dataset_head_ref_missing", "dataset_seed_missing")
	srv.Psql(t, db, "-c", "CALL pgconsistency.refresh()")
	want := map[string]int{
		"dataset_head_ref_missing": len(fixture.Breakage["dataset_head_ref_missing"]),
		"dataset_seed_missing":     len(fixture.Breakage["dataset_seed_missing"]),
	}

	proxy := startStallProxy(t, net.JoinHostPort(srv.Host, strconv.Itoa(srv.Port)))
	sink, _ := startReceiver(t, srv, db, func(cfg *Config) {
		cfg.Endpoint = proxy.addr()
		cfg.CollectionInterval = interval
		cfg.Timeout = timeout
	})
	waitFor(t, sink, "before the stall", expectCounts(want))
	// The receiver's own goroutines: all of them but the proxy's two per connection.
	receiverGoroutines := func() int { return runtime.NumGoroutine() - 2*proxy.openPairs() }
	before := receiverGoroutines()

	stalledAt := time.Now()
	proxy.stall()
	// A stall long enough for several scrapes; the assertions are on the
	// scrape timestamps recorded meanwhile, not on this wait.
	time.Sleep(stallFor)
	resumedAt := time.Now()
	proxy.resume()
	waitFor(t, sink, "after the stall", expectCounts(want))

	points := upPoints(sink)
	var during []upPoint
	for i, p := range points {
		if i > 0 {
			gap := p.at.Sub(points[i-1].at)
			assert.Less(t, gap, maxGap, "scrape %d started %s after the previous one: a scrape hung past its timeout (%s)", i, gap, timeout)
		}
		// A scrape that starts just before resume may connect after it.
		if p.at.After(stalledAt) && p.at.Before(resumedAt.Add(-100*time.Millisecond)) {
			during = append(during, p)
		}
	}
	// About 7 in 3.5 s; fewer than 4 means scrapes were held up.
	assert.GreaterOrEqual(t, len(during), 4, "scrapes during the %s stall: %v", stallFor, during)
	for _, p := range during {
		assert.Zero(t, p.up, "scrape at %s, %s into the stall, reported up = 1", p.at.Format(time.RFC3339Nano), p.at.Sub(stalledAt))
	}

	// Connections given up on are closed by the pool, so the proxy closes
	// their server side and the backends go away.
	admin := srv.Conn(t, "")
	var conns int
	countConns := func() int {
		require.NoError(t, admin.QueryRow(t.Context(),
			"SELECT count(*) FROM pg_stat_activity WHERE application_name = 'otelcol-pgconsistency'").Scan(&conns))
		return conns
	}
	recoveredAt := time.Now()
	conns = pollUntil(30*time.Second, countConns, func(n int) bool { return n <= 2 })
	assert.LessOrEqual(t, conns, 2, "receiver sessions in pg_stat_activity after the stall (the pool's MaxConns is 2)")
	pairs := pollUntil(30*time.Second, proxy.openPairs, func(n int) bool { return n <= 2 })
	assert.LessOrEqual(t, pairs, 2, "connections still open through the proxy after the stall: %s", proxy.describe())

	// Goroutines of the stalled connections end once they are given up on.
	// pgx closes a pooled connection interrupted by a timeout in the
	// background, after a cancel request on a new connection that it waits
	// for up to 15 s: over a silent network that is the full 15 s (about
	// 12 s here, counted from the recovery), at most one per pooled connection.
	after := pollUntil(30*time.Second, receiverGoroutines, func(n int) bool { return n <= before })
	assert.LessOrEqual(t, after, before, "goroutines outside the proxy: %d before the stall, %d after", before, after)
	t.Logf("stall %s: %d scrapes during it, all up = 0; counts back %s after resume; "+
		"%d receiver sessions, %d proxied connections and %d goroutines (%d before) %s after that",
		stallFor, len(during), recoveredAt.Sub(resumedAt).Round(time.Millisecond),
		conns, pairs, after, before, time.Since(recoveredAt).Round(time.Millisecond))
}
