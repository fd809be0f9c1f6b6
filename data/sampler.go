package data

import (
	"fmt"
	"math/bits"
	"math/rand/v2"
	"sort"
	"sync"
)

// Sampler maps a position in the training stream to a window of tokens,
// deterministically, so that any worker can compute its own batch for any
// step from (seed, step) alone, and a restarted or re-sharded run sees
// exactly the batches it would have seen.
//
// Windows. Each shard is cut on its own into non-overlapping windows of
// seqLen+1 tokens starting at offset 0 (the last partial window of a shard
// is dropped; with shards of millions of tokens that loses a negligible
// amount and avoids windows that straddle files). A window gives seqLen
// inputs and the seqLen next-token targets shifted by one. Windows are
// numbered across shards in shard order.
//
// Epochs. Epoch e visits every window exactly once, in the order of a
// Fisher–Yates shuffle driven by a PCG generator (math/rand/v2.PCG, the
// PCG-DXSM 128-bit algorithm) seeded with (seed, splitmix64(e)). Only
// PCG.Uint64 is used: its output is fixed by the algorithm's definition,
// whereas the convenience methods of math/rand/v2 (Perm, Shuffle, IntN) may
// change between Go releases. The bounded draw and the shuffle are written
// out here, so the order depends on nothing else. TestPermutationGolden pins
// it.
//
// Positions. Fill and Window accept any position p ≥ 0 within an epoch
// argument e; p maps to epoch e + p/NumWindows, index p%NumWindows. Training
// therefore passes epoch 0 and the absolute position: step s with global
// batch GB covers positions [s·GB, (s+1)·GB), and BatchRange gives each
// worker its contiguous slice.
//
// A Sampler is safe for concurrent use.
type Sampler struct {
	ds      *Dataset
	seqLen  int
	stride  int // distance between window starts
	seed    uint64
	shuffle bool
	first   []int // first[i] = index of shard i's first window; len = shards+1
	n       int

	mu    sync.Mutex
	perms map[int][]int32 // small cache: a batch touches at most two epochs
}

// NewSampler builds the shuffled training sampler. It fails when the dataset
// holds no complete window of seqLen+1 tokens.
func NewSampler(ds *Dataset, seqLen int, seed uint64) (*Sampler, error) {
	return newSampler(ds, seqLen, seqLen+1, seed, true)
}

// EvalWindows builds an unshuffled sampler for validation: Fill(0, i, ...)
// returns windows in dataset order, and positions 0..NumWindows()-1 cover the
// data once. Windows start every seqLen tokens (one token of overlap), so
// every target token is predicted exactly once (except a tail shorter than
// seqLen at each shard's end), and the mean loss over all windows is the
// per-token validation loss.
func EvalWindows(ds *Dataset, seqLen int) (*Sampler, error) {
	return newSampler(ds, seqLen, seqLen, 0, false)
}

func newSampler(ds *Dataset, seqLen, stride int, seed uint64, shuffle bool) (*Sampler, error) {
	if ds == nil {
		return nil, fmt.Errorf("data: sampler: nil dataset")
	}
	if seqLen <= 0 {
		return nil, fmt.Errorf("data: sampler: sequence length %d must be positive", seqLen)
	}
	s := &Sampler{ds: ds, seqLen: seqLen, stride: stride, seed: seed, shuffle: shuffle, perms: map[int][]int32{}}
	s.first = make([]int, ds.NumShards()+1)
	for i := range ds.NumShards() {
		w := 0
		if l := len(ds.Shard(i)); l >= seqLen+1 {
			w = (l-(seqLen+1))/stride + 1
		}
		s.first[i+1] = s.first[i] + w
	}
	s.n = s.first[ds.NumShards()]
	if s.n == 0 {
		return nil, fmt.Errorf("data: sampler: %s has %d tokens, fewer than one window of seqLen+1 = %d in any shard; use a shorter --seq-len or more data",
			ds.Name, ds.NumTokens(), seqLen+1)
	}
	if int64(s.n) > 1<<31-1 {
		return nil, fmt.Errorf("data: sampler: %d windows exceed the int32 permutation limit", s.n)
	}
	return s, nil
}

// NumWindows is the number of windows in one epoch.
func (s *Sampler) NumWindows() int { return s.n }

// SeqLen is the sequence length each window yields.
func (s *Sampler) SeqLen() int { return s.seqLen }

// Window returns where the window at index i of epoch epoch starts: the
// shard and the token offset within it. i outside [0, NumWindows) carries
// into neighbouring epochs as described on Sampler.
func (s *Sampler) Window(epoch, i int) (shard int, offset int64) {
	e, idx := s.normalize(epoch, i)
	return s.locate(s.windowAt(e, idx))
}

// Fill writes count sequences for positions start..start+count-1 of epoch:
// sequence k's inputs go to tokens[k*seqLen:(k+1)*seqLen] and its targets
// (inputs shifted by one) to the same range of targets. Both slices must
// hold exactly count*seqLen elements.
func (s *Sampler) Fill(epoch int, start, count int, tokens, targets []int32) error {
	if start < 0 || count < 0 {
		return fmt.Errorf("data: fill: start %d and count %d must be non-negative", start, count)
	}
	want := count * s.seqLen
	if len(tokens) != want || len(targets) != want {
		return fmt.Errorf("data: fill: %d sequences of %d need %d tokens and targets, got %d and %d", count, s.seqLen, want, len(tokens), len(targets))
	}
	for k := range count {
		e, idx := s.normalize(epoch, start+k)
		shard, off := s.locate(s.windowAt(e, idx))
		src := s.ds.Shard(shard)[off : off+int64(s.seqLen)+1]
		copy(tokens[k*s.seqLen:(k+1)*s.seqLen], src[:s.seqLen])
		copy(targets[k*s.seqLen:(k+1)*s.seqLen], src[1:])
	}
	return nil
}

// normalize folds position p of epoch into (epoch + p/n, p mod n) with floor
// division, so negative positions are well defined too.
func (s *Sampler) normalize(epoch, p int) (int, int) {
	q, r := p/s.n, p%s.n
	if r < 0 {
		q, r = q-1, r+s.n
	}
	return epoch + q, r
}

// locate turns a global window number into (shard, token offset).
func (s *Sampler) locate(w int) (int, int64) {
	shard := sort.Search(len(s.first)-1, func(i int) bool { return s.first[i+1] > w })
	return shard, int64(w-s.first[shard]) * int64(s.stride)
}

func (s *Sampler) windowAt(epoch, idx int) int {
	if !s.shuffle {
		return idx
	}
	return int(s.perm(epoch)[idx])
}

func (s *Sampler) perm(epoch int) []int32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p, ok := s.perms[epoch]; ok {
		return p
	}
	if len(s.perms) >= 2 {
		clear(s.perms)
	}
	p := permutation(s.n, s.seed, uint64(epoch))
	s.perms[epoch] = p
	return p
}

// permutation is a Fisher–Yates shuffle of 0..n-1 driven only by
// PCG.Uint64, so it is fixed by the PCG-DXSM definition rather than by Go's
// library code. The epoch goes through splitmix64 so that consecutive epochs
// seed the generator with unrelated states.
func permutation(n int, seed, epoch uint64) []int32 {
	r := rand.NewPCG(seed, splitmix64(epoch))
	p := make([]int32, n)
	for i := range p {
		p[i] = int32(i)
	}
	for i := n - 1; i > 0; i-- {
		j := bounded(r, uint64(i)+1)
		p[i], p[j] = p[j], p[i]
	}
	return p
}

// bounded returns a uniform value in [0, n) by Lemire's multiply-and-reject
// method (unbiased).
func bounded(r *rand.PCG, n uint64) uint64 {
	hi, lo := bits.Mul64(r.Uint64(), n)
	if lo < n {
		thresh := -n % n
		for lo < thresh {
			hi, lo = bits.Mul64(r.Uint64(), n)
		}
	}
	return hi
}

func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// BatchRange returns the positions worker rank of worldSize reads at step:
// the global batch of step covers [step·globalBatch, (step+1)·globalBatch),
// split into contiguous slices, the first globalBatch%worldSize workers
// taking one extra sequence. Pass start and count to Fill with epoch 0.
func BatchRange(step, globalBatch, rank, worldSize int) (start, count int, err error) {
	if step < 0 || globalBatch <= 0 || worldSize <= 0 || rank < 0 || rank >= worldSize {
		return 0, 0, fmt.Errorf("data: batch range: need step ≥ 0, global batch > 0, 0 ≤ rank < world size; got step %d, global batch %d, rank %d, world size %d",
			step, globalBatch, rank, worldSize)
	}
	if globalBatch < worldSize {
		return 0, 0, fmt.Errorf("data: batch range: global batch %d is smaller than world size %d, leaving workers idle", globalBatch, worldSize)
	}
	base, extra := globalBatch/worldSize, globalBatch%worldSize
	count = base
	off := rank * base
	if rank < extra {
		count++
		off += rank
	} else {
		off += extra
	}
	return step*globalBatch + off, count, nil
}
