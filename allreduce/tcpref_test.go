package allreduce

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// TestTCPRing: the plain-TCP reference ring that benchmarks measure the
// gRPC path against computes the same bits as the real ring: correct sums
// and averages, bitwise identical on every rank, odd lengths.
func TestTCPRing(t *testing.T) {
	for _, n := range []int{1, 2, 3, 5} {
		t.Run(fmt.Sprintf("ranks=%d", n), func(t *testing.T) {
			lis, addrs := listeners(t, n)
			rings := make([]*TCPRing, n)
			for i := range rings {
				c := testConfig()
				c.Rank, c.Peers = i, addrs
				r, err := NewTCPRing(c, lis[i])
				if err != nil {
					t.Fatal(err)
				}
				rings[i] = r
				t.Cleanup(func() { _ = r.Close() })
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			for i, err := range parallel(n, func(i int) error { return rings[i].Connect(ctx) }) {
				if err != nil {
					t.Fatalf("rank %d connect: %v", i, err)
				}
			}
			for _, l := range []int{0, 1, 4097, 50_003} {
				for _, kind := range []Op{Sum, Avg} {
					in := seededInputs(uint64(l), n, l)
					bufs := make([][]float32, n)
					for i := range bufs {
						bufs[i] = append([]float32(nil), in[i]...)
					}
					for i, err := range parallel(n, func(i int) error { return rings[i].AllReduce(ctx, bufs[i], kind) }) {
						if err != nil {
							t.Fatalf("rank %d: %v", i, err)
						}
					}
					checkResults(t, in, bufs, kind, false)
				}
			}
		})
	}
}

// TestTCPRingRefusesBF16: the reference carries float32 only.
func TestTCPRingRefusesBF16(t *testing.T) {
	c := testConfig()
	c.Peers, c.WireBF16 = []string{"127.0.0.1:1", "127.0.0.1:2"}, true
	if _, err := NewTCPRing(c, nil); err == nil {
		t.Fatal("bf16 accepted")
	}
}
