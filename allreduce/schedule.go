package allreduce

import "fmt"

// Plan is the ring all-reduce schedule of one rank for one buffer length. It
// does no I/O: the transport asks it which elements to send and where the
// received ones go, and tests run it over in-memory "networks".
//
// The buffer of Length elements is split into N segments (sizes differ by at
// most one element) and every segment into the same number of pipelined
// chunks. There are 2(N-1) steps: steps 0..N-2 are reduce-scatter (the
// received chunk is added into the local buffer), steps N-1..2N-3 are
// all-gather (the received chunk overwrites the local buffer). At step s rank
// r sends segment SendSegment(s) to rank r+1 and receives segment
// RecvSegment(s) from rank r-1. Sending chunk j of step s>0 needs chunk j of
// step s-1 to have been received first; that is the only ordering constraint,
// which is what lets chunks of successive steps overlap (pipelining).
//
// Segment k is fully reduced on rank k-1 (mod N) after the last
// reduce-scatter step; that rank is its owner.
type Plan struct {
	N, Rank   int
	Length    int // elements in the whole buffer
	ChunkElem int // largest chunk, in elements
	Chunks    int // chunks per segment (≥1, the same for every segment)
}

// NewPlan builds rank's plan for n ranks and length elements, with chunks of
// at most chunkElems elements.
func NewPlan(n, rank, length, chunkElems int) (Plan, error) {
	switch {
	case n < 1:
		return Plan{}, fmt.Errorf("allreduce: plan for %d ranks: %w", n, ErrConfig)
	case rank < 0 || rank >= n:
		return Plan{}, fmt.Errorf("allreduce: plan: rank %d out of range [0,%d): %w", rank, n, ErrConfig)
	case length < 0:
		return Plan{}, fmt.Errorf("allreduce: plan: negative length %d: %w", length, ErrConfig)
	case chunkElems < 1:
		return Plan{}, fmt.Errorf("allreduce: plan: chunk of %d elements: %w", chunkElems, ErrConfig)
	}
	maxSeg := (length + n - 1) / n
	chunks := (maxSeg + chunkElems - 1) / chunkElems
	if chunks < 1 {
		chunks = 1 // an empty buffer still runs the protocol, so ranks check each other's length
	}
	return Plan{N: n, Rank: rank, Length: length, ChunkElem: chunkElems, Chunks: chunks}, nil
}

// Steps is the number of communication steps, 2(N-1).
func (p Plan) Steps() int { return 2 * (p.N - 1) }

// IsReduce reports whether step s is a reduce-scatter step.
func (p Plan) IsReduce(s int) bool { return s < p.N-1 }

// Segment returns the element range [lo,hi) of segment k.
func (p Plan) Segment(k int) (lo, hi int) {
	return balanced(p.Length, p.N, k)
}

// Chunk returns the element range [lo,hi) of chunk j of segment k.
func (p Plan) Chunk(k, j int) (lo, hi int) {
	slo, shi := p.Segment(k)
	clo, chi := balanced(shi-slo, p.Chunks, j)
	return slo + clo, slo + chi
}

// SendSegment is the segment rank sends at step s.
func (p Plan) SendSegment(s int) int {
	if p.IsReduce(s) {
		return mod(p.Rank-s, p.N)
	}
	return mod(p.Rank+1-(s-(p.N-1)), p.N)
}

// RecvSegment is the segment rank receives at step s.
func (p Plan) RecvSegment(s int) int {
	if p.IsReduce(s) {
		return mod(p.Rank-1-s, p.N)
	}
	return mod(p.Rank-(s-(p.N-1)), p.N)
}

// Owned is the segment this rank finishes reducing (at step N-2) and then
// broadcasts unchanged during all-gather.
func (p Plan) Owned() int { return mod(p.Rank+1, p.N) }

// Finishes reports whether receiving step s completes the reduction of the
// owned segment (so averaging and wire rounding are applied right after it).
func (p Plan) Finishes(s int) bool { return s == p.N-2 }

// part selects which steps of the schedule a collective runs: all of them
// (all-reduce), the reduce-scatter half or the all-gather half.
type part int

const (
	partAll part = iota
	partReduceScatter
	partAllGather
)

func (k part) String() string {
	switch k {
	case partReduceScatter:
		return "reduce-scatter"
	case partAllGather:
		return "all-gather"
	}
	return "all-reduce"
}

// StepRange is the steps [first, end) a collective of kind k runs:
// [0, 2(N-1)) for an all-reduce, [0, N-1) for a reduce-scatter (after
// which the rank holds segment Owned() fully reduced, and nothing else
// reduced), [N-1, 2(N-1)) for an all-gather (which starts from the owned
// segment and copies every other rank's owned segment in). The halves keep
// their step numbers, so a frame of one half can never be taken for the
// other.
func (p Plan) StepRange(k part) (first, end int) {
	switch k {
	case partReduceScatter:
		return 0, p.N - 1
	case partAllGather:
		return p.N - 1, p.Steps()
	}
	return 0, p.Steps()
}

// Index flattens (step, chunk) for per-op bookkeeping.
func (p Plan) Index(s, j int) int { return s*p.Chunks + j }

// balanced splits n items into parts pieces whose sizes differ by at most one
// and returns piece i's range.
func balanced(n, parts, i int) (lo, hi int) {
	q, r := n/parts, n%parts
	lo = i*q + min(i, r)
	hi = lo + q
	if i < r {
		hi++
	}
	return lo, hi
}

func mod(a, n int) int {
	a %= n
	if a < 0 {
		a += n
	}
	return a
}
