package worker

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/data"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cpu"
	"github.com/bmojo/bmojo/model"
	"github.com/bmojo/bmojo/train"
)

// lateCopier is a CPU backend whose async downloads land late and out of
// order (each after its own random delay), as a GPU's copy stream may
// relative to the goroutines waiting for them: the values are taken at
// the call, in op order, and written into dst only later.
type lateCopier struct {
	*cpu.Backend[float32]
	mu  sync.Mutex
	rng *rand.Rand
}

func newLateCopier(seed uint64) *lateCopier {
	return &lateCopier{Backend: cpu.New[float32](), rng: rand.New(rand.NewPCG(seed, 1))}
}

func (l *lateCopier) DownloadAsync(dst []float32, src kernels.Buffer) func() error {
	snap := make([]float32, len(dst))
	l.Download(snap, src)
	l.mu.Lock()
	delay := time.Duration(l.rng.IntN(3000)) * time.Microsecond
	l.mu.Unlock()
	done := make(chan struct{})
	time.AfterFunc(delay, func() { copy(dst, snap); close(done) })
	return sync.OnceValue(func() error { <-done; return l.Err() })
}

func (l *lateCopier) UploadAsync(dst kernels.Buffer, src []float32) func() error {
	return l.Backend.UploadAsync(dst, src)
}

var _ kernels.AsyncCopier[float32] = (*lateCopier)(nil)

// reducerPath is one way a ringReducer moves gradients: the reference
// (synchronous copies) or the overlapped path, on backends of a kind.
type reducerPath struct {
	name       string
	syncCopies bool
	backend    func(rank int) kernels.Backend[float32]
}

func cpuBackend(int) kernels.Backend[float32] { return cpu.New[float32]() }

// TestReducerPathsBitIdentical: the reference path, the overlapped path on
// the CPU backend, and the overlapped path on a backend whose copies land
// late leave the same bits.
func TestReducerPathsBitIdentical(t *testing.T) {
	checkReducerPaths(t, []reducerPath{
		{"sync", true, cpuBackend},
		{"overlapped", false, cpuBackend},
		{"overlapped late copies", false, func(rank int) kernels.Backend[float32] { return newLateCopier(uint64(rank) + 7) }},
	})
}

// checkReducerPaths: over a real 2-rank ring on loopback (shared memory,
// and gRPC), three steps of layer ranges of odd sizes, started last layer
// first with a scale on each rank, leave the same bits on both ranks
// whichever path moved them (the first is the reference), and those bits
// are the scaled sums.
func checkReducerPaths(t *testing.T, paths []reducerPath) {
	for _, transport := range []string{allreduce.TransportAuto, allreduce.TransportGRPC} {
		t.Run(transport, func(t *testing.T) {
			runReducerPaths(t, func(reducerPath) []*allreduce.Ring { return testRings(t, 2, transport) }, paths)
		})
	}
}

// runReducerPaths runs 3 steps of 6 gradient ranges through each path's
// reducer on 2 ranks, over the (connected here) rings of rings(path), and
// checks that every path on every rank has the bits of the first path's
// rank 0, and that those are the scaled sums.
func runReducerPaths[C allreduce.Collective](t *testing.T, rings func(reducerPath) []C, paths []reducerPath) {
	sizes := []int{3, 1000, 77, 1 << 16, 5, 4099} // layer ranges; backward starts the last
	total := 0
	for _, n := range sizes {
		total += n
	}
	scales := []float32{0.75, 0.25} // rank r's rows / global batch
	const steps = 3
	values := func(step, rank int) []float32 {
		rng := rand.New(rand.NewPCG(uint64(step), uint64(rank)))
		v := make([]float32, total)
		for i := range v {
			v[i] = float32(rng.NormFloat64())
		}
		return v
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	got := map[string][steps][2][]float32{}
	for _, p := range paths {
		rs := rings(p)
		connect(ctx, t, rs)
		var res [steps][2][]float32
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for rank := range 2 {
			wg.Go(func() {
				be := p.backend(rank)
				red := &ringReducer{ctx: ctx, ring: rs[rank], rank: rank, size: 2, be: be, syncCopies: p.syncCopies}
				g := be.Alloc(total)
				for step := range steps {
					be.Upload(g, values(step, rank))
					off := total
					for i := len(sizes) - 1; i >= 0; i-- {
						off -= sizes[i]
						red.Start(be.Slice(g, off, sizes[i]), scales[rank])
					}
					if errs[rank] = red.Finish(); errs[rank] != nil {
						return
					}
					res[step][rank] = make([]float32, total)
					be.Download(res[step][rank], g)
					if errs[rank] = be.Err(); errs[rank] != nil {
						return
					}
				}
			})
		}
		wg.Wait()
		for rank, err := range errs {
			if err != nil {
				t.Fatalf("%s: rank %d: %v", p.name, rank, err)
			}
		}
		got[p.name] = res
	}
	ref := got[paths[0].name]
	for step := range steps {
		a, b := values(step, 0), values(step, 1)
		for i, v := range ref[step][0] {
			want := float64(a[i]*scales[0]) + float64(b[i]*scales[1])
			if math.Abs(float64(v)-want) > 1e-6*(1+math.Abs(want)) {
				t.Fatalf("step %d: element %d sums to %v, want %v", step, i, v, want)
			}
		}
		for _, p := range paths {
			for rank := range 2 {
				if i := firstDiff(got[p.name][step][rank], ref[step][0]); i >= 0 {
					t.Errorf("%s: step %d, rank %d: element %d is %v, the reference's rank 0 has %v",
						p.name, step, rank, i, got[p.name][step][rank][i], ref[step][0][i])
				}
			}
		}
	}
}

// firstDiff is the first index where a and b differ bit for bit, or -1.
func firstDiff(a, b []float32) int {
	if len(a) != len(b) {
		return 0
	}
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			return i
		}
	}
	return -1
}

// firstFar is the first index where a and b differ by more than tol, or
// -1.
func firstFar(a, b []float32, tol float64) int {
	if len(a) != len(b) {
		return 0
	}
	for i := range a {
		if !(math.Abs(float64(a[i])-float64(b[i])) <= tol) {
			return i
		}
	}
	return -1
}

// connect connects every rank of rings at once.
func connect[C allreduce.Collective](ctx context.Context, t *testing.T, rings []C) {
	t.Helper()
	errs := make([]error, len(rings))
	var wg sync.WaitGroup
	for i, r := range rings {
		wg.Go(func() { errs[i] = r.Connect(ctx) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: connect: %v", i, err)
		}
	}
}

// TestTrainStepOverlapBitIdentical trains a tiny model with two replicas
// over a real ring, through the reference path and the overlapped one: the
// parameters after each step are bit for bit the same on both ranks and on
// both paths, and every step reports its communication and the exposed
// part of it.
func TestTrainStepOverlapBitIdentical(t *testing.T) {
	checkTrainStepPaths(t, cpuBackend, 0)
}

// checkTrainStepPaths is TestTrainStepOverlapBitIdentical on the backends
// newBackend returns, one per rank and path. With tol > 0 it holds only
// each path's ranks to each other, within tol: on a GPU, float atomics
// make backward and the gradient norm (hence the clipping) differ in their
// last bits from one run, and one rank, to the next.
func checkTrainStepPaths(t *testing.T, newBackend func(rank int) kernels.Backend[float32], tol float64) {
	c, err := model.Preset("bmojo-tiny")
	if err != nil {
		t.Fatal(err)
	}
	c.SeqLen = 32
	const steps, gb = 2, 3 // 3 sequences over 2 ranks: rows 2 and 1, scales 2/3 and 1/3
	rng := rand.New(rand.NewPCG(3, 4))
	toks := make([]int32, 40*(c.SeqLen+1))
	for i := range toks {
		toks[i] = int32(rng.IntN(c.VocabSize))
	}
	ds, err := data.NewMemoryDataset(toks, c.VocabSize)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	rings := testRings(t, 2, allreduce.TransportAuto)
	connect(ctx, t, rings)
	params := map[string][steps][2][]float32{}
	paths := []struct {
		name       string
		syncCopies bool
	}{{"sync", true}, {"overlapped", false}}
	for _, p := range paths {
		var res [steps][2][]float32
		errs := make([]error, 2)
		var wg sync.WaitGroup
		for rank := range 2 {
			wg.Go(func() {
				errs[rank] = func() error {
					be := newBackend(rank)
					m, err := model.New[float32](be, c, 1)
					if err != nil {
						return err
					}
					s, err := data.NewSampler(ds, c.SeqLen, 1)
					if err != nil {
						return err
					}
					eng := &train.Engine{M: m, Opt: model.NewOptimizer(m, model.DefaultOptim(1e-2, steps)), Train: s, GB: gb}
					red := NewStepReducer(ctx, rings[rank], rank, 2, be, p.syncCopies)
					for step := range steps {
						st, err := eng.TrainStep(red)
						if err != nil {
							return err
						}
						if st.Comm <= 0 || st.Exposed <= 0 || st.Hidden() < 0 || st.Hidden() > 1 {
							return fmt.Errorf("step %d: communication %v, exposed %v, hidden %v", step, st.Comm, st.Exposed, st.Hidden())
						}
						res[step][rank] = m.ParamsF32()
					}
					return nil
				}()
			})
		}
		wg.Wait()
		for rank, err := range errs {
			if err != nil {
				t.Fatalf("%s: rank %d: %v", p.name, rank, err)
			}
		}
		params[p.name] = res
	}
	for step := range steps {
		for _, p := range paths {
			ref, refName := params["sync"][step][0], "the reference's rank 0"
			if tol > 0 {
				ref, refName = params[p.name][step][0], "rank 0"
			}
			for rank := range 2 {
				got := params[p.name][step][rank]
				i := firstDiff(got, ref)
				if tol > 0 {
					i = firstFar(got, ref, tol)
				}
				if i >= 0 {
					t.Errorf("%s: after step %d, rank %d: parameter %d is %v, %s has %v",
						p.name, step, rank, i, got[i], refName, ref[i])
				}
			}
		}
	}
}

// TestUnion: the communication time is the union of the collectives'
// lifetimes, gaps left out.
func TestUnion(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	for _, tc := range []struct {
		name  string
		spans [][2]int // milliseconds, in start order
		want  time.Duration
	}{
		{"none", nil, 0},
		{"one", [][2]int{{0, 5}}, 5 * time.Millisecond},
		{"queued behind each other", [][2]int{{0, 5}, {1, 9}, {2, 12}}, 12 * time.Millisecond},
		{"inside the first", [][2]int{{0, 10}, {1, 3}}, 10 * time.Millisecond},
		{"gap", [][2]int{{0, 5}, {8, 10}}, 7 * time.Millisecond},
		{"touching", [][2]int{{0, 5}, {5, 6}}, 6 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var spans [][2]time.Time
			for _, s := range tc.spans {
				spans = append(spans, [2]time.Time{at(s[0]), at(s[1])})
			}
			if got := union(spans); got != tc.want {
				t.Errorf("union %v, want %v", got, tc.want)
			}
		})
	}
}

// TestOverlap: communication counts from each collective's latest start
// across replicas, exposure from the last replica's backward end.
func TestOverlap(t *testing.T) {
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	span := func(a, b int) [2]time.Time { return [2]time.Time{at(a), at(b)} }
	rs := []ReplicaStep{
		{Arrive: at(100), End: at(130), Spans: [][2]time.Time{span(10, 40), span(50, 120)}},
		{Arrive: at(110), End: at(131), Spans: [][2]time.Time{span(20, 45), span(60, 125)}},
	}
	comm, exposed := Overlap(rs)
	// Latest starts 20 and 60: replica 0 [20,40] ∪ [60,120] = 80 ms,
	// replica 1 [20,45] ∪ [60,125] = 90 ms. After the last backward (110):
	// 20 and 21 ms.
	if comm != 170*time.Millisecond || exposed != 41*time.Millisecond {
		t.Fatalf("comm %v exposed %v, want 170ms and 41ms", comm, exposed)
	}
	// A replica that waited all along for a slower one: its collective
	// ended as the other's started, which counts nothing.
	rs = []ReplicaStep{
		{Arrive: at(10), End: at(50), Spans: [][2]time.Time{span(0, 50)}},
		{Arrive: at(50), End: at(50), Spans: [][2]time.Time{span(50, 50)}},
	}
	if comm, exposed := Overlap(rs); comm != 0 || exposed != 0 {
		t.Fatalf("skew only: comm %v exposed %v, want 0 and 0", comm, exposed)
	}
	if comm, exposed := Overlap(nil); comm != 0 || exposed != 0 {
		t.Fatalf("no replicas: comm %v exposed %v", comm, exposed)
	}
}
