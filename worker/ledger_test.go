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
// real 3-rank ring: every rank ends with every rank's report, exactly
// (positions near 2^47 and checksums using all 64 bits), and the loss sums
// as before.
func TestLedgerReportsGathered(t *testing.T) {
	const n, T = 3, 4
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
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
		r, err := allreduce.New(cfg, lis[i])
		if err != nil {
			t.Fatal(err)
		}
		rings[i] = r
	}
	var wg sync.WaitGroup
	defer func() {
		for _, r := range rings {
			wg.Go(func() { _ = r.Close() })
		}
		wg.Wait()
	}()
	ids := []string{"a", "b", "c"}
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
			if errs[i] = rings[i].Connect(ctx); errs[i] != nil {
				return
			}
			red := &ledgerReducer{ringReducer: &ringReducer{ctx: ctx, ring: rings[i], rank: i, size: n}, ids: ids}
			red.Batch(start, count, tokens, targets)
			out, err := red.Sum([]float64{float64(i) + 0.25})
			red.wait()
			if errs[i] = err; err == nil {
				sums[i], got[i] = out[0], red.got
			}
		})
	}
	run.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("rank %d: %v", i, errs[i])
		}
		if sums[i] != 3.75 {
			t.Errorf("rank %d: loss sum %v, want 3.75", i, sums[i])
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
