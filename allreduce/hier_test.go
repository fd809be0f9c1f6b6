package allreduce

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// newHier builds hosts × local hierarchical ranks on loopback: per host a
// local ring (shared memory where this machine has it), per local index a
// cross-host ring over gRPC. Rank h·local+l is local rank l of host h.
func newHier(t *testing.T, hosts, local int, bf16 bool) []*Hier {
	t.Helper()
	locals := make([][]*Ring, hosts)
	for h := range locals {
		locals[h] = newRings(t, local, func(_ int, c *Config) { c.WireBF16 = bf16 })
	}
	cross := make([][]*Ring, local)
	for l := range cross {
		cross[l] = newRings(t, hosts, func(_ int, c *Config) { c.WireBF16, c.Transport = bf16, TransportGRPC })
	}
	out := make([]*Hier, 0, hosts*local)
	for h := range hosts {
		for l := range local {
			out = append(out, &Hier{Local: locals[h][l], Cross: cross[l][h]})
		}
	}
	return out
}

// TestHierMatchesTheSum: every shape of hosts × ranks per host, odd lengths,
// sum and average, float32 and bf16 on the wire: each rank ends with the
// float64 reduction of all ranks' inputs (within the wire's tolerance) and
// the same bits as every other rank.
func TestHierMatchesTheSum(t *testing.T) {
	checkNoLeaks(t)
	for _, shape := range [][2]int{{2, 2}, {3, 2}, {2, 3}, {1, 3}, {3, 1}} {
		for _, bf16 := range []bool{false, true} {
			hosts, local := shape[0], shape[1]
			t.Run(fmt.Sprintf("hosts=%d/local=%d/bf16=%v", hosts, local, bf16), func(t *testing.T) {
				hs := newHier(t, hosts, local, bf16)
				n := hosts * local
				for _, l := range oddLengths(n, 1024) {
					for _, kind := range []Op{Sum, Avg} {
						in := seededInputs(uint64(l)+7, n, l)
						bufs := make([][]float32, n)
						for i := range bufs {
							bufs[i] = append([]float32(nil), in[i]...)
						}
						ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
						errs := parallel(n, func(i int) error { return hs[i].AllReduce(ctx, bufs[i], kind) })
						cancel()
						for i, err := range errs {
							if err != nil {
								t.Fatalf("length %d: rank %d: %v", l, i, err)
							}
						}
						// bf16 rounds the inputs three times (two local
						// passes, one across hosts) instead of once.
						checkResults(t, in, bufs, kind, bf16)
					}
				}
			})
		}
	}
}

// TestHierFailure: a broken cross-host ring fails the collective on the
// ranks that use it, with an error that says where, and does not hang the
// others of their host (their local ring breaks with the first one).
func TestHierFailure(t *testing.T) {
	checkNoLeaks(t)
	hs := newHier(t, 2, 2, false)
	// Local index 1's cross ring goes away on host 0.
	if err := hs[1].Cross.Close(); err != nil {
		t.Fatal(err)
	}
	bufs := make([][]float32, len(hs))
	for i := range bufs {
		bufs[i] = make([]float32, 4096)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	errs := parallel(len(hs), func(i int) error { return hs[i].AllReduce(ctx, bufs[i], Sum) })
	if ctx.Err() != nil {
		t.Fatalf("the ranks hung until the deadline: %v", errs)
	}
	if !errors.Is(errs[1], ErrClosed) || !strings.Contains(errs[1].Error(), "across hosts") {
		t.Fatalf("rank 1 (its cross ring closed): %v, want ErrClosed across hosts", errs[1])
	}
	// The others fail too, each within a hop timeout: rank 3 at the other
	// end of the closed ring, ranks 0 and 2 in their host's gather, which
	// their failed neighbour never joins. The caller re-forms the rings, as
	// after any ring failure.
	for i, err := range errs {
		if err == nil {
			t.Fatalf("rank %d finished a collective that a closed ring was part of", i)
		}
	}
}

// TestHierNeedsRings: a Hier without its rings is a configuration error,
// not a panic.
func TestHierNeedsRings(t *testing.T) {
	if err := (&Hier{}).AllReduce(context.Background(), make([]float32, 4), Sum); !errors.Is(err, ErrConfig) {
		t.Fatalf("got %v, want ErrConfig", err)
	}
}
