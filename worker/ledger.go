package worker

import (
	"fmt"

	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/train"
)

// ledgerReducer is the ring's Reducer for one training step, which also
// gathers what every rank reports it read: the engine shows it the batch
// this replica trains on (Batch), and the report rides in the step's own
// loss sum. A rank that applied the step therefore holds every rank's
// report, and any survivor can commit the step's ledger entry. The sum was
// one collective already; a few more numbers leave the step's time as it
// was.
type ledgerReducer struct {
	*ringReducer
	ids  []string     // the ring's members, rank order
	mine job.Consumed // this rank's report (Batch)
	sum  chan uint64  // the checksum of the batch, hashed while forward runs; nil until Batch
	got  []job.Consumed
}

var _ train.BatchObserver = (*ledgerReducer)(nil)

// reportLen is the numbers of one rank's report in the sum: start, count,
// the checksum as four 16-bit pieces, and whether a batch was seen.
const reportLen = 7

// Batch records the batch the engine is about to train on. The checksum is
// computed beside forward and backward (the engine does not refill the
// batch before the step's sums, which wait for it).
func (r *ledgerReducer) Batch(start, count int, tokens, targets []int32) {
	r.mine.Start, r.mine.Count = start, count
	r.sum = make(chan uint64, 1)
	go func() { r.sum <- windowChecksum(tokens, targets, count) }()
}

// wait returns once the checksum goroutine Batch started has ended (a
// step that failed before its sums leaves one running).
func (r *ledgerReducer) wait() {
	if r.sum != nil {
		<-r.sum
		r.sum = nil
	}
}

// Sum sums xs over the ranks and gathers the reports: each rank fills its
// own slot of a zero vector, so every slot's sum is its rank's report,
// exactly (ringReducer.Sum keeps integers below 2^48 exact).
func (r *ledgerReducer) Sum(xs []float64) ([]float64, error) {
	n := len(xs)
	buf := make([]float64, n+reportLen*r.size)
	copy(buf, xs)
	if r.sum != nil {
		sum := <-r.sum
		r.sum = nil
		slot := buf[n+reportLen*r.rank:]
		slot[0], slot[1] = float64(r.mine.Start), float64(r.mine.Count)
		for i := range 4 {
			slot[2+i] = float64(sum >> (16 * i) & 0xffff)
		}
		slot[6] = 1
	}
	out, err := r.ringReducer.Sum(buf)
	if err != nil {
		return nil, err
	}
	r.got = make([]job.Consumed, r.size)
	for rank := range r.size {
		slot := out[n+reportLen*rank:]
		c := job.Consumed{Rank: rank, Range: job.Range{Start: int(slot[0]), Count: int(slot[1])}}
		if rank < len(r.ids) {
			c.ID = r.ids[rank]
		}
		if slot[6] == 1 {
			var sum uint64
			for i := range 4 {
				sum |= uint64(slot[2+i]) << (16 * i)
			}
			c.Checksum = fmt.Sprintf("%016x", sum)
		}
		r.got[rank] = c
	}
	return out[:n], nil
}

// windowChecksum is FNV-1a 64 over count windows of seqLen+1 tokens (see
// job.Consumed): sequence k's inputs tokens[k·T:(k+1)·T], then its last
// target, each as 4 little-endian bytes.
func windowChecksum(tokens, targets []int32, count int) uint64 {
	const offset, prime = 14695981039346656037, 1099511628211
	h := uint64(offset)
	add := func(v int32) {
		u := uint32(v)
		for range 4 {
			h ^= uint64(u & 0xff)
			h *= prime
			u >>= 8
		}
	}
	if count == 0 {
		return h
	}
	T := len(tokens) / count
	for k := range count {
		for _, v := range tokens[k*T : (k+1)*T] {
			add(v)
		}
		add(targets[(k+1)*T-1])
	}
	return h
}
