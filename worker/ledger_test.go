package worker

import (
	"context"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/job"
)

// TestLedgerReportsGathered: the reports ride in the step's loss sum on a
// real ring, flat (3 ranks) and hierarchical (2 hosts × 2): every rank ends
// with every rank's report, exactly (positions near 2^47 and checksums
// using all 64 bits), and the loss sums as before.
func TestLedgerReportsGathered(t *testing.T) {
	for _, tc := range []struct {
		name         string
		hosts, local int // hosts == 0: one flat ring of local ranks
	}{
		{"flat 3", 0, 3},
		{"hier 2x2", 2, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var colls []allreduce.Collective
			if tc.hosts == 0 {
				for _, r := range testRings(t, tc.local, allreduce.TransportAuto) {
					colls = append(colls, r)
				}
			} else {
				locals := make([][]*allreduce.Ring, tc.hosts)
				for h := range locals {
					locals[h] = testRings(t, tc.local, allreduce.TransportAuto)
				}
				cross := make([][]*allreduce.Ring, tc.local)
				for l := range cross {
					cross[l] = testRings(t, tc.hosts, allreduce.TransportGRPC)
				}
				for h := range tc.hosts {
					for l := range tc.local {
						colls = append(colls, &allreduce.Hier{Local: locals[h][l], Cross: cross[l][h]})
					}
				}
			}
			checkReportsGathered(ctx, t, colls)
		})
	}
}

// testRings makes n unconnected ranks of one ring on loopback, closed
// together at the end of the test.
func testRings(t *testing.T, n int, transport string) []*allreduce.Ring {
	t.Helper()
	return testRingsWith(t, n, func(_ int, cfg *allreduce.Config) { cfg.Transport = transport })
}

// testRingsWith is testRings with each rank's config set by set.
func testRingsWith(t *testing.T, n int, set func(rank int, cfg *allreduce.Config)) []*allreduce.Ring {
	t.Helper()
	lis := make([]net.Listener, n)
	peers := make([]string, n)
	for i := range lis {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lis[i], peers[i] = l, l.Addr().String()
	}
	rings := make([]*allreduce.Ring, n)
	for i := range rings {
		cfg := allreduce.Default()
		cfg.Rank, cfg.Peers, cfg.Epoch = i, peers, 1
		set(i, &cfg)
		r, err := allreduce.New(cfg, lis[i])
		if err != nil {
			t.Fatal(err)
		}
		rings[i] = r
	}
	t.Cleanup(func() {
		var wg sync.WaitGroup
		for _, r := range rings {
			wg.Go(func() { _ = r.Close() })
		}
		wg.Wait()
	})
	return rings
}

// checkReportsGathered runs one step's sums with reports on every rank of
// colls (connecting them first) and checks what each rank gathered.
func checkReportsGathered(ctx context.Context, t *testing.T, colls []allreduce.Collective) {
	t.Helper()
	const T = 4
	n := len(colls)
	ids := make([]string, n)
	for i := range ids {
		ids[i] = string(rune('a' + i))
	}
	want := make([]job.Consumed, n)
	got := make([][]job.Consumed, n)
	sums := make([]float64, n)
	errs := make([]error, n)
	var run sync.WaitGroup
	for i := range n {
		count := i + 1
		tokens, targets := make([]int32, count*T), make([]int32, count*T)
		for k := range tokens {
			tokens[k], targets[k] = int32(k*7919+i)-1<<30, int32(k*104729+i)
		}
		start := 1<<47 - 10 + 3*i
		want[i] = job.Consumed{ID: ids[i], Rank: i, Range: job.Range{Start: start, Count: count},
			Checksum: fmt.Sprintf("%016x", windowChecksum(tokens, targets, count))}
		run.Go(func() {
			if errs[i] = colls[i].Connect(ctx); errs[i] != nil {
				return
			}
			red := &ledgerReducer{ringReducer: &ringReducer{ctx: ctx, ring: colls[i], rank: i, size: n}, ids: ids}
			red.Batch(start, count, tokens, targets)
			out, err := red.Sum([]float64{float64(i) + 0.25})
			red.wait()
			if errs[i] = err; err == nil {
				sums[i], got[i] = out[0], red.got
			}
		})
	}
	run.Wait()
	wantSum := float64(n*(n-1))/2 + 0.25*float64(n)
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("rank %d: %v", i, errs[i])
		}
		if sums[i] != wantSum {
			t.Errorf("rank %d: loss sum %v, want %v", i, sums[i], wantSum)
		}
		if fmt.Sprint(got[i]) != fmt.Sprint(want) {
			t.Errorf("rank %d gathered %v, want %v", i, got[i], want)
		}
	}
}

// BenchmarkLedgerReport is what the ledger adds to one step on the
// training goroutine, by local batch (rows × seq_len): the checksum (which
// otherwise runs beside forward and backward) and the report's encoding in
// the loss sum, on a ring of one (the sum itself is the step's one small
// collective either way).
func BenchmarkLedgerReport(b *testing.B) {
	for _, s := range []struct{ rows, T int }{{2, 64}, {8, 1024}, {32, 2048}} {
		b.Run(fmt.Sprintf("%dx%d", s.rows, s.T), func(b *testing.B) {
			tokens, targets := make([]int32, s.rows*s.T), make([]int32, s.rows*s.T)
			red := &ledgerReducer{ringReducer: &ringReducer{size: 1}, ids: []string{"a"}}
			b.SetBytes(int64(s.rows * (s.T + 1) * 4))
			for b.Loop() {
				red.Batch(0, s.rows, tokens, targets)
				if _, err := red.Sum([]float64{1}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
