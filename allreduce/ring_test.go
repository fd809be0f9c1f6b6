package allreduce

import (
	"context"
	"errors"
	"fmt"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bmojo/bmojo/internal/testlog"
	"github.com/hashicorp/go-hclog"
)

// testConfig shrinks chunks (so small buffers still pipeline over several
// chunks and streams) and deadlines.
func testConfig() Config {
	c := Default()
	c.ChunkBytes = 4 << 10
	c.Streams = 2
	c.HopTimeout = 3 * time.Second
	c.WindowBytes = 1 << 20
	c.ReadBufferBytes, c.WriteBufferBytes = 64<<10, 64<<10
	return c
}

func testLogger(t *testing.T) hclog.Logger { return testlog.New(t, hclog.Warn) }

// checkNoLeaks fails the test if goroutines started during it are still
// running shortly after it ends.
func checkNoLeaks(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				t.Errorf("goroutine leak: %d running, %d before\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
				return
			}
			time.Sleep(10 * time.Millisecond) // polling, not waiting for a guess
		}
	})
}

// transports are the data paths every ring test runs over: gRPC streams,
// the same-host shared-memory path that "auto" picks on one machine, and
// data sockets.
var transports = []string{TransportGRPC, TransportAuto, TransportSocket}

// forTransports runs body once per transport, as a named subtest.
func forTransports(t *testing.T, body func(t *testing.T, transport string)) {
	for _, tr := range transports {
		name := tr
		if tr == TransportAuto {
			name = "shm"
		}
		t.Run(name, func(t *testing.T) { body(t, tr) })
	}
}

// wantTransport is the data path of the hop from a rank configured with
// from to one configured with to.
func wantTransport(from, to Config) string {
	if from.Transport == TransportSocket && to.Transport == TransportSocket {
		return TransportSocket
	}
	if from.Transport != TransportAuto || to.Transport != TransportAuto || from.hostID != to.hostID ||
		(from.hostID == "" && hostIdentity() == "") {
		return TransportGRPC
	}
	return TransportShm
}

// requireShm skips a test of the same-host path where it does not exist.
func requireShm(t testing.TB) {
	t.Helper()
	if hostIdentity() == "" {
		t.Skip("no same-host path on this platform (it needs Linux's boot id)")
	}
}

// checkTransports fails the test unless every hop uses the data path its
// two ends' configs call for, so a test meant for shared memory cannot
// silently run over gRPC.
func checkTransports(t *testing.T, rings []*Ring, cfgs []Config) {
	t.Helper()
	n := len(rings)
	if n == 1 {
		return
	}
	for i, r := range rings {
		out, in := r.Transport()
		wantOut := wantTransport(cfgs[i], cfgs[(i+1)%n])
		wantIn := wantTransport(cfgs[(i+n-1)%n], cfgs[i])
		if out != wantOut || in != wantIn {
			t.Fatalf("rank %d: transport to successor %q, from predecessor %q; want %q, %q", i, out, in, wantOut, wantIn)
		}
	}
}

// listeners opens n loopback listeners and returns them with their addresses.
func listeners(t *testing.T, n int) ([]net.Listener, []string) {
	t.Helper()
	lis, addrs := listenersNoT(n)
	if lis == nil {
		t.Fatal("cannot listen on loopback")
	}
	return lis, addrs
}

func listenersNoT(n int) ([]net.Listener, []string) {
	lis := make([]net.Listener, n)
	addrs := make([]string, n)
	for i := range lis {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, nil
		}
		lis[i], addrs[i] = l, l.Addr().String()
	}
	return lis, addrs
}

// newRings starts and connects an n-rank ring on loopback, closing it at
// the end of the test.
func newRings(t *testing.T, n int, mod func(rank int, c *Config)) []*Ring {
	t.Helper()
	lis, addrs := listeners(t, n)
	rings := make([]*Ring, n)
	cfgs := make([]Config, n)
	for i := range rings {
		c := testConfig()
		c.Rank, c.Peers, c.Epoch, c.Logger = i, addrs, 5, testLogger(t)
		if mod != nil {
			mod(i, &c)
		}
		r, err := New(c, lis[i])
		if err != nil {
			t.Fatal(err)
		}
		rings[i], cfgs[i] = r, c
	}
	t.Cleanup(func() {
		// Together, as real ranks do: a graceful Close waits for the
		// neighbours' Close.
		parallel(len(rings), func(i int) error { return rings[i].Close() })
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	errs := parallel(n, func(i int) error { return rings[i].Connect(ctx) })
	for i, err := range errs {
		if err != nil {
			t.Fatalf("rank %d connect: %v", i, err)
		}
	}
	checkTransports(t, rings, cfgs)
	return rings
}

func parallel(n int, f func(i int) error) []error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			errs[i] = f(i)
		}(i)
	}
	wg.Wait()
	return errs
}

// allReduceAll runs one collective on every rank and returns the buffers.
func allReduceAll(t *testing.T, rings []*Ring, inputs [][]float32, kind Op) [][]float32 {
	t.Helper()
	bufs := make([][]float32, len(rings))
	for i := range bufs {
		bufs[i] = append([]float32(nil), inputs[i]...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i, err := range parallel(len(rings), func(i int) error { return rings[i].AllReduce(ctx, bufs[i], kind) }) {
		if err != nil {
			t.Fatalf("rank %d: %v", i, err)
		}
	}
	return bufs
}

// TestRingOddLengths: 1..8 ranks over real gRPC, every odd length, sum and
// average, float32 and bf16 wire; results match the float64 reduction and are
// bitwise identical on every rank.
func TestRingOddLengths(t *testing.T) {
	checkNoLeaks(t)
	forTransports(t, func(t *testing.T, transport string) {
		for n := 1; n <= 8; n++ {
			for _, bf16 := range []bool{false, true} {
				if n == 1 && bf16 {
					continue
				}
				t.Run(fmt.Sprintf("ranks=%d/bf16=%v", n, bf16), func(t *testing.T) {
					rings := newRings(t, n, func(_ int, c *Config) { c.WireBF16, c.Transport = bf16, transport })
					for _, l := range oddLengths(n, 1024) {
						for _, kind := range []Op{Sum, Avg} {
							in := seededInputs(uint64(l), n, l)
							got := allReduceAll(t, rings, in, kind)
							checkResults(t, in, got, kind, bf16)
						}
					}
				})
			}
		}
	})
}

// TestRingMixedTransports: hops of one ring may differ (a rank that forces
// gRPC, ranks on other hosts); the results are the same bits either way.
func TestRingMixedTransports(t *testing.T) {
	checkNoLeaks(t)
	cases := []struct {
		name string
		mod  func(rank int, c *Config)
	}{
		{"one rank forces grpc", func(rank int, c *Config) {
			if rank == 1 {
				c.Transport = TransportGRPC
			}
		}},
		{"two hosts", func(rank int, c *Config) { c.hostID = fmt.Sprintf("host-%d", rank/2) }},
		{"every rank on its own host", func(rank int, c *Config) { c.hostID = fmt.Sprintf("host-%d", rank) }},
		{"sockets, shm and grpc hops", func(rank int, c *Config) {
			if rank < 2 {
				c.Transport = TransportSocket
			}
		}},
		{"socket ranks, one forces grpc", func(rank int, c *Config) {
			c.Transport = TransportSocket
			if rank == 1 {
				c.Transport = TransportGRPC
			}
		}},
		{"one socket per hop", func(_ int, c *Config) { c.Transport, c.Streams = TransportSocket, 1 }},
		{"one queue, two slots", func(_ int, c *Config) { c.ShmQueues, c.ShmSlots = 1, 2 }},
		{"more queues than chunks", func(_ int, c *Config) { c.ShmQueues = 7 }},
	}
	for _, c := range cases {
		for _, bf16 := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/bf16=%v", c.name, bf16), func(t *testing.T) {
				const n = 4
				rings := newRings(t, n, func(rank int, cfg *Config) { cfg.WireBF16 = bf16; c.mod(rank, cfg) })
				for _, l := range []int{0, 1, 1009, 4*1024 + 1, 50_003} {
					in := seededInputs(uint64(l), n, l)
					checkResults(t, in, allReduceAll(t, rings, in, Avg), Avg, bf16)
				}
			})
		}
	}
}

// TestRingBucketsOverlap starts several buckets back to back, as backward
// would, and waits on them in reverse order.
func TestRingBucketsOverlap(t *testing.T) {
	checkNoLeaks(t)
	forTransports(t, testRingBucketsOverlap)
}

func testRingBucketsOverlap(t *testing.T, transport string) {
	rings := newRings(t, 3, func(_ int, c *Config) { c.Transport = transport })
	colls := make([]Collective, len(rings))
	for r, ring := range rings {
		colls[r] = ring
	}
	checkBucketsOverlap(t, colls, []int{50_000, 1, 0, 12_345, 7}, 0)
}

// checkBucketsOverlap starts buckets of sizes on every rank of colls back
// to back (Start), as backward starts them, waits for them in reverse
// order, and checks each holds the average, bitwise identical across
// ranks, and that no collective has failed. Bucket b's inputs come from
// seed b+seed.
func checkBucketsOverlap(t *testing.T, colls []Collective, sizes []int, seed uint64) {
	t.Helper()
	n := len(colls)
	inputs := make([][][]float32, len(sizes))
	bufs := make([][][]float32, len(sizes))
	for b, l := range sizes {
		inputs[b] = seededInputs(uint64(b)+seed, n, l)
		bufs[b] = make([][]float32, n)
		for r := range bufs[b] {
			bufs[b][r] = append([]float32(nil), inputs[b][r]...)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	errs := parallel(n, func(r int) error {
		handles := make([]*Handle, len(sizes))
		for b := range sizes {
			handles[b] = colls[r].Start(bufs[b][r], Avg)
		}
		for b := len(handles) - 1; b >= 0; b-- {
			if err := handles[b].Wait(ctx); err != nil {
				return err
			}
		}
		return colls[r].Err()
	})
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: %v", r, err)
		}
	}
	for b := range sizes {
		got := make([][]float32, n)
		for r := range got {
			got[r] = bufs[b][r]
		}
		checkResults(t, inputs[b], got, Avg, false)
	}
}

// TestRingLengthMismatch: ranks that disagree on the length fail with an
// error naming the peer, not a hang.
func TestRingLengthMismatch(t *testing.T) {
	checkNoLeaks(t)
	forTransports(t, testRingLengthMismatch)
}

func testRingLengthMismatch(t *testing.T, transport string) {
	rings := newRings(t, 3, func(_ int, c *Config) { c.Transport = transport })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	errs := parallel(3, func(i int) error {
		return rings[i].AllReduce(ctx, make([]float32, 100+boolInt(i == 1)), Sum)
	})
	for i, err := range errs {
		var pe *PeerError
		if !errors.As(err, &pe) || !strings.Contains(err.Error(), "buffer of 10") {
			t.Errorf("rank %d: err = %v, want a PeerError saying the lengths differ", i, err)
		}
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("failing took %v", el)
	}
	// The ring stays broken: the next collective fails at once.
	if err := rings[0].AllReduce(ctx, make([]float32, 10), Sum); err == nil {
		t.Error("collective on a broken ring succeeded")
	}
}

// TestRingChunkMismatch: a rank configured with another ChunkBytes is
// refused in the handshake, with an error that names the setting, rather
// than failing on the first frame of another size.
func TestRingChunkMismatch(t *testing.T) {
	checkNoLeaks(t)
	lis, addrs := listeners(t, 2)
	rings := make([]*Ring, 2)
	for i := range rings {
		c := testConfig()
		c.Rank, c.Peers, c.Epoch, c.Logger = i, addrs, 5, testLogger(t)
		c.ChunkBytes = 64 << 10 << i // rank 1 chunks twice as much
		r, err := New(c, lis[i])
		if err != nil {
			t.Fatal(err)
		}
		rings[i] = r
	}
	defer parallel(2, func(i int) error { return rings[i].Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	errs := parallel(2, func(i int) error { return rings[i].Connect(ctx) })
	if errs[0] == nil && errs[1] == nil {
		errs = parallel(2, func(i int) error { return rings[i].AllReduce(ctx, make([]float32, 1000), Sum) })
	}
	// Both ranks fail, each saying why (the receiver's own error is
	// ErrConfig; the sender's comes back through gRPC as text).
	for i, err := range errs {
		if err == nil || !strings.Contains(err.Error(), "same ChunkBytes") {
			t.Errorf("rank %d: err = %v, want one naming ChunkBytes", i, err)
		}
	}
	if !errors.Is(rings[0].Err(), ErrConfig) && !errors.Is(rings[1].Err(), ErrConfig) {
		t.Errorf("neither ring's Err is ErrConfig: %v, %v", rings[0].Err(), rings[1].Err())
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestRingEpochMismatch: a predecessor of another epoch is refused and the
// error says why.
func TestRingEpochMismatch(t *testing.T) {
	checkNoLeaks(t)
	forTransports(t, testRingEpochMismatch)
}

func testRingEpochMismatch(t *testing.T, transport string) {
	lis, addrs := listeners(t, 2)
	var rings []*Ring
	for i := 0; i < 2; i++ {
		c := testConfig()
		c.Rank, c.Peers, c.Epoch, c.Logger, c.Transport = i, addrs, uint64(5+i), testLogger(t), transport
		r, err := New(c, lis[i])
		if err != nil {
			t.Fatal(err)
		}
		rings = append(rings, r)
		defer r.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for i, err := range parallel(2, func(i int) error { return rings[i].Connect(ctx) }) {
		if !errors.Is(err, ErrEpoch) {
			t.Errorf("rank %d: err = %v, want ErrEpoch", i, err)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	ok := Default()
	ok.Peers = []string{"a:1", "b:2"}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		mod  func(*Config)
		flag string
	}{
		{"no peers", func(c *Config) { c.Peers = nil }, "Peers"},
		{"rank", func(c *Config) { c.Rank = 2 }, "Rank"},
		{"chunk", func(c *Config) { c.ChunkBytes = 1 }, "ChunkBytes"},
		{"streams", func(c *Config) { c.Streams = 0 }, "Streams"},
		{"timeout", func(c *Config) { c.HopTimeout = -1 }, "HopTimeout"},
		{"window", func(c *Config) { c.WindowBytes = 10 }, "WindowBytes"},
		{"transport", func(c *Config) { c.Transport = "tcp" }, "Transport"},
		{"queues", func(c *Config) { c.ShmQueues = 32 }, "ShmQueues"},
		{"slots", func(c *Config) { c.ShmSlots = 1 }, "ShmSlots"},
	} {
		c2 := ok
		c.mod(&c2)
		err := c2.Validate()
		if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), c.flag) {
			t.Errorf("%s: err = %v, want ErrConfig naming %s", c.name, err, c.flag)
		}
	}
}

// TestCloseRightAfterCollective: ranks finish a collective at slightly
// different times and close at once; the slower ranks must still succeed
// (found on the GPU machine: a rank that closed first broke its neighbour's
// last collective).
func TestCloseRightAfterCollective(t *testing.T) {
	checkNoLeaks(t)
	forTransports(t, testCloseRightAfterCollective)
}

func testCloseRightAfterCollective(t *testing.T, transport string) {
	for rep := 0; rep < 5; rep++ {
		lis, addrs := listeners(t, 3)
		rings := make([]*Ring, 3)
		for i := range rings {
			c := testConfig()
			c.Rank, c.Peers, c.Epoch, c.Logger, c.Transport = i, addrs, 5, testLogger(t), transport
			r, err := New(c, lis[i])
			if err != nil {
				t.Fatal(err)
			}
			rings[i] = r
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		in := seededInputs(uint64(rep), 3, 300_000)
		errs := parallel(3, func(i int) error {
			if err := rings[i].Connect(ctx); err != nil {
				return err
			}
			err := rings[i].AllReduce(ctx, in[i], Sum)
			_ = rings[i].Close()
			return err
		})
		cancel()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("rep %d rank %d: %v", rep, i, err)
			}
		}
	}
}

// TestRingUnixSockets: ranks on one machine may use Unix sockets.
func TestRingUnixSockets(t *testing.T) {
	checkNoLeaks(t)
	forTransports(t, testRingUnixSockets)
}

func testRingUnixSockets(t *testing.T, transport string) {
	dir := t.TempDir()
	const n = 3
	addrs := make([]string, n)
	for i := range addrs {
		addrs[i] = fmt.Sprintf("unix:%s/r%d.sock", dir, i)
	}
	rings := make([]*Ring, n)
	cfgs := make([]Config, n)
	for i := range rings {
		c := testConfig()
		c.Rank, c.Peers, c.Epoch, c.Logger, c.Transport = i, addrs, 5, testLogger(t), transport
		cfgs[i] = c
		r, err := New(c, nil)
		if err != nil {
			t.Fatal(err)
		}
		rings[i] = r
	}
	defer parallel(n, func(i int) error { return rings[i].Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i, err := range parallel(n, func(i int) error { return rings[i].Connect(ctx) }) {
		if err != nil {
			t.Fatalf("rank %d: %v", i, err)
		}
	}
	checkTransports(t, rings, cfgs)
	in := seededInputs(11, n, 100_003)
	checkResults(t, in, allReduceAll(t, rings, in, Avg), Avg, false)
}

// TestStartAfterClose: a closed ring answers at once instead of hanging.
func TestStartAfterClose(t *testing.T) {
	checkNoLeaks(t)
	forTransports(t, testStartAfterClose)
}

func testStartAfterClose(t *testing.T, transport string) {
	// A short hop deadline bounds how long the first Close waits for its
	// neighbour, which is not closing.
	rings := newRings(t, 2, func(_ int, c *Config) { c.HopTimeout, c.Transport = 300*time.Millisecond, transport })
	_ = rings[0].Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := rings[0].AllReduce(ctx, make([]float32, 10), Sum); !errors.Is(err, ErrClosed) {
		t.Fatalf("err = %v, want ErrClosed", err)
	}
}
