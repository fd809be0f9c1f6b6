package allreduce

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestRingHalves: over real rings (both data paths), a reduce-scatter
// leaves each rank's owned segment with exactly the bits an all-reduce of
// the same inputs gives it, and an all-gather that starts from nothing but
// the owned segments (every other element a NaN guard) gives every rank the
// all-reduce's bits; 1, 2, 3 and 5 ranks, every odd length (lengths below
// the rank count leave some segments empty), sum and average, float32 and
// bf16 on the wire.
func TestRingHalves(t *testing.T) {
	checkNoLeaks(t)
	forTransports(t, func(t *testing.T, transport string) {
		for _, n := range []int{1, 2, 3, 5} {
			for _, bf16 := range []bool{false, true} {
				if n == 1 && bf16 {
					continue
				}
				t.Run(fmt.Sprintf("ranks=%d/bf16=%v", n, bf16), func(t *testing.T) {
					rings := newRings(t, n, func(_ int, c *Config) { c.WireBF16, c.Transport = bf16, transport })
					for _, l := range oddLengths(n, 1024) {
						for _, kind := range []Op{Sum, Avg} {
							in := seededInputs(uint64(l)+3, n, l)
							whole := allReduceAll(t, rings, in, kind)
							checkHalves(t, rings, in, whole, kind)
						}
					}
				})
			}
		}
	})
}

// checkHalves runs a reduce-scatter then an all-gather on every rank and
// compares both with the all-reduce's result whole, bit for bit.
func checkHalves(t *testing.T, rings []*Ring, in, whole [][]float32, kind Op) {
	t.Helper()
	n := len(rings)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	rs := make([][]float32, n)
	for i := range rs {
		rs[i] = append([]float32(nil), in[i]...)
	}
	for i, err := range parallel(n, func(i int) error { return rings[i].ReduceScatter(ctx, rs[i], kind) }) {
		if err != nil {
			t.Fatalf("length %d: rank %d reduce-scatter: %v", len(in[0]), i, err)
		}
	}
	// The owned ranges tile the buffer: segment k is rank k-1's.
	covered := 0
	for k := range n {
		lo, hi := rings[(k+n-1)%n].Owned(len(in[0]))
		if lo != covered || hi < lo {
			t.Fatalf("length %d: segment %d is [%d,%d), want it to start at %d", len(in[0]), k, lo, hi, covered)
		}
		covered = hi
	}
	if covered != len(in[0]) {
		t.Fatalf("length %d: owned ranges cover %d elements", len(in[0]), covered)
	}
	guarded := make([][]float32, n)
	for i, r := range rings {
		lo, hi := r.Owned(len(in[i]))
		if !slices.Equal(f32Bits(rs[i][lo:hi]), f32Bits(whole[i][lo:hi])) {
			t.Fatalf("length %d op %d: rank %d's reduce-scatter segment [%d,%d) differs from the all-reduce's", len(in[i]), kind, i, lo, hi)
		}
		guarded[i] = make([]float32, len(in[i]))
		for j := range guarded[i] {
			guarded[i][j] = float32(math.NaN())
		}
		copy(guarded[i][lo:hi], rs[i][lo:hi])
	}
	for i, err := range parallel(n, func(i int) error { return rings[i].AllGather(ctx, guarded[i]) }) {
		if err != nil {
			t.Fatalf("length %d: rank %d all-gather: %v", len(in[0]), i, err)
		}
	}
	for i := range guarded {
		if !slices.Equal(f32Bits(guarded[i]), f32Bits(whole[i])) {
			t.Fatalf("length %d op %d: rank %d after the all-gather differs from the all-reduce", len(in[i]), kind, i)
		}
	}
}

// TestRingHalvesMismatch: a rank that runs a reduce-scatter while its
// neighbour runs an all-gather fails with an error saying so, at once, not
// at a hop deadline.
func TestRingHalvesMismatch(t *testing.T) {
	checkNoLeaks(t)
	forTransports(t, func(t *testing.T, transport string) {
		rings := newRings(t, 2, func(_ int, c *Config) { c.Transport = transport })
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		start := time.Now()
		errs := parallel(2, func(i int) error {
			buf := make([]float32, 5000)
			if i == 0 {
				return rings[i].ReduceScatter(ctx, buf, Sum)
			}
			return rings[i].AllGather(ctx, buf)
		})
		for i, err := range errs {
			// Whichever rank sees the other's frame first blames it; the
			// abort carries that verdict to the other.
			var pe *PeerError
			if !errors.As(err, &pe) || !strings.Contains(err.Error(), "step out of range") {
				t.Errorf("rank %d: %v, want a PeerError saying a step is out of range", i, err)
			}
		}
		if el := time.Since(start); el > 2*time.Second {
			t.Errorf("failing took %v", el)
		}
	})
}
