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
// figures are lower than `bmojo bench allreduce`'s), over gRPC and over the
// same-host shared-memory path in the same run; it exists for comparing them
// and for profiling. MB/s is the buffer size over the time (algbw); busbw is
// algbw · 2(N−1)/N.
func BenchmarkRing(b *testing.B) {
	for _, transport := range []string{TransportGRPC, TransportShm} {
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
		if transport == TransportGRPC {
			c.Transport = TransportGRPC
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
