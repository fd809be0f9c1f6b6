package allreduce

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// BenchmarkRing all-reduces in one process (all ranks share the CPUs, so
// figures are lower than `bmojo bench allreduce`'s); it exists for profiling.
func BenchmarkRing(b *testing.B) {
	for _, n := range []int{2, 4} {
		for _, size := range []int{1 << 20, 64 << 20} {
			b.Run(fmt.Sprintf("ranks=%d/size=%dMiB", n, size>>20), func(b *testing.B) {
				lis, addrs := listenersNoT(n)
				rings := make([]*Ring, n)
				for i := range rings {
					c := Default()
					c.Rank, c.Peers, c.Epoch = i, addrs, 1
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
			})
		}
	}
}
