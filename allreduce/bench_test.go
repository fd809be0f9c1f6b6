package allreduce

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"
)

// BenchmarkRing all-reduces in one process (all ranks share the CPUs, so
// figures are lower than `bmojo bench allreduce`'s), over gRPC, over data
// sockets and over the same-host shared-memory path in the same run; it
// exists for comparing them and for profiling. MB/s is the buffer size over
// the time (algbw); busbw is algbw · 2(N−1)/N.
func BenchmarkRing(b *testing.B) {
	for _, transport := range []string{TransportGRPC, TransportSocket, TransportShm} {
		for _, n := range []int{2, 4} {
			for _, size := range []int{1 << 20, 64 << 20} {
				for _, bf16 := range []bool{false, true} {
					name := fmt.Sprintf("transport=%s/ranks=%d/size=%dMiB/bf16=%v", transport, n, size>>20, bf16)
					b.Run(name, func(b *testing.B) { benchRing(b, transport, n, size, bf16) })
				}
			}
		}
	}
}

func benchRing(b *testing.B, transport string, n, size int, bf16 bool) {
	if transport == TransportShm {
		requireShm(b)
	}
	lis, addrs := listenersNoT(n)
	rings := make([]*Ring, n)
	for i := range rings {
		c := Default()
		c.Rank, c.Peers, c.Epoch, c.WireBF16 = i, addrs, 1, bf16
		if transport != TransportShm {
			c.Transport = transport
		}
		if q, err := strconv.Atoi(os.Getenv("BMOJO_BENCH_SHM_QUEUES")); err == nil {
			c.ShmQueues = q // for trying other counts without a rebuild
		}
		r, err := New(c, lis[i])
		if err != nil {
			b.Fatal(err)
		}
		rings[i] = r
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	defer parallel(n, func(i int) error { return rings[i].Close() })
	parallel(n, func(i int) error { return rings[i].Connect(ctx) })
	if out, _ := rings[0].Transport(); out != transport {
		b.Fatalf("rank 0 sends over %q, want %q", out, transport)
	}
	bufs := make([][]float32, n)
	for i := range bufs {
		bufs[i] = make([]float32, size/4)
	}
	b.SetBytes(int64(size))
	b.ResetTimer()
	for it := 0; it < b.N; it++ {
		for i, err := range parallel(n, func(i int) error { return rings[i].AllReduce(ctx, bufs[i], Sum) }) {
			if err != nil {
				b.Fatalf("rank %d: %v", i, err)
			}
		}
	}
	b.StopTimer() // Close (deferred) is not part of a collective
	b.ReportMetric(float64(size)/(b.Elapsed().Seconds()/float64(b.N))/1e9*2*float64(n-1)/float64(n), "busbw_GB/s")
}

// BenchmarkHier compares, in one process, 2 "hosts" × 2 ranks: a flat
// 4-rank ring over gRPC (every hop treated as a network hop, as it is when
// the ranks are on different machines) against Hier (hier-shm-grpc/rs-ag:
// reduce-scatter in the host over shared memory, an all-reduce of each
// rank's half across the hosts over gRPC, all-gather in the host) and
// against the scheme Hier ran before Ring had a reduce-scatter
// (hier-shm-grpc/2allreduce: the whole buffer all-reduced in the host, the
// half across, then the halves gathered by a second whole-buffer
// all-reduce of zeros and halves), on the same rings in the same run. All
// ranks share this machine's CPUs and loopback, so the figures say what
// each scheme costs here, not what a network would give.
func BenchmarkHier(b *testing.B) {
	requireShm(b)
	const hosts, local, size = 2, 2, 64 << 20
	n := hosts * local
	ring := func(k int, transport string) []*Ring {
		lis, addrs := listenersNoT(k)
		rs := make([]*Ring, k)
		for i := range rs {
			c := Default()
			c.Rank, c.Peers, c.Epoch, c.Transport = i, addrs, 1, transport
			r, err := New(c, lis[i])
			if err != nil {
				b.Fatal(err)
			}
			rs[i] = r
		}
		return rs
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	connect := func(rs []*Ring) {
		for i, err := range parallel(len(rs), func(i int) error { return rs[i].Connect(ctx) }) {
			if err != nil {
				b.Fatalf("rank %d connect: %v", i, err)
			}
		}
	}
	bufs := make([][]float32, n)
	for i := range bufs {
		bufs[i] = make([]float32, size/4)
	}
	run := func(b *testing.B, one func(i int) error) {
		b.SetBytes(size)
		b.ResetTimer()
		for it := 0; it < b.N; it++ {
			for i, err := range parallel(n, one) {
				if err != nil {
					b.Fatalf("rank %d: %v", i, err)
				}
			}
		}
		b.StopTimer()
		b.ReportMetric(float64(size)/(b.Elapsed().Seconds()/float64(b.N))/1e9, "algbw_GB/s")
	}
	b.Run("flat-grpc", func(b *testing.B) {
		rs := ring(n, TransportGRPC)
		defer parallel(n, func(i int) error { return rs[i].Close() })
		connect(rs)
		run(b, func(i int) error { return rs[i].AllReduce(ctx, bufs[i], Sum) })
	})
	b.Run("hier-shm-grpc", func(b *testing.B) {
		var all []*Ring
		hs := make([]*Hier, n)
		for h := range hosts {
			rs := ring(local, TransportAuto)
			for l := range local {
				hs[h*local+l] = &Hier{Local: rs[l]}
			}
			all = append(all, rs...)
		}
		for l := range local {
			rs := ring(hosts, TransportGRPC)
			for h := range hosts {
				hs[h*local+l].Cross = rs[h]
			}
			all = append(all, rs...)
		}
		defer parallel(len(all), func(i int) error { return all[i].Close() })
		connect(all)
		b.Run("rs-ag", func(b *testing.B) {
			run(b, func(i int) error { return hs[i].AllReduce(ctx, bufs[i], Sum) })
		})
		b.Run("2allreduce", func(b *testing.B) {
			run(b, func(i int) error { return twoAllReduces(ctx, hs[i], bufs[i]) })
		})
	})
}

// twoAllReduces is the hierarchical sum as Hier ran it before Ring had a
// reduce-scatter, kept for BenchmarkHier's comparison: all-reduce the whole
// buffer in the host, all-reduce this rank's slice across the hosts, zero
// the rest and all-reduce the whole buffer in the host again (x + 0 is x).
func twoAllReduces(ctx context.Context, h *Hier, buf []float32) error {
	if err := h.Local.AllReduce(ctx, buf, Sum); err != nil {
		return err
	}
	lo, hi := balanced(len(buf), h.Local.Size(), h.Local.rank)
	if err := h.Cross.AllReduce(ctx, buf[lo:hi], Sum); err != nil {
		return err
	}
	clear(buf[:lo])
	clear(buf[hi:])
	return h.Local.AllReduce(ctx, buf, Sum)
}
