package allreduce

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
)

// oddLengths are the buffer lengths every all-reduce test covers for n ranks:
// empty, tiny, primes, and lengths around multiples of n and of the chunk.
func oddLengths(n, chunk int) []int {
	ls := []int{0, 1, 2, 3, 7, 13, 1009, n - 1, n + 1, 3*n + 1, chunk*n - 1, chunk*n + 1, 2*chunk*n + 7}
	out := ls[:0]
	seen := map[int]bool{}
	for _, l := range ls {
		if l >= 0 && !seen[l] {
			seen[l] = true
			out = append(out, l)
		}
	}
	return out
}

// seededInputs returns n buffers of length l with values in [-1,1).
func seededInputs(seed uint64, n, l int) [][]float32 {
	rng := rand.New(rand.NewPCG(seed, uint64(n)*1_000_003+uint64(l)))
	in := make([][]float32, n)
	for r := range in {
		in[r] = make([]float32, l)
		for i := range in[r] {
			in[r][i] = float32(rng.Float64()*2 - 1)
		}
	}
	return in
}

// checkResults asserts every rank's buffer is within tolerance of the
// float64 reduction and that all ranks are bitwise identical.
func checkResults(t *testing.T, inputs, got [][]float32, kind Op, bf16 bool) {
	t.Helper()
	n := len(inputs)
	rel := 1e-5
	if bf16 {
		rel = 2e-2
	}
	for i := range got[0] {
		var sum, abs float64
		for r := 0; r < n; r++ {
			sum += float64(inputs[r][i])
			abs += math.Abs(float64(inputs[r][i]))
		}
		if kind == Avg {
			sum /= float64(n)
			abs /= float64(n)
		}
		if d := math.Abs(float64(got[0][i]) - sum); d > rel*abs+1e-6 {
			t.Fatalf("element %d: got %v, want %v (|diff| %g)", i, got[0][i], sum, d)
		}
		for r := 1; r < n; r++ {
			if math.Float32bits(got[r][i]) != math.Float32bits(got[0][i]) {
				t.Fatalf("element %d: rank %d has %v (%#x), rank 0 has %v (%#x): ranks differ",
					i, r, got[r][i], math.Float32bits(got[r][i]), got[0][i], math.Float32bits(got[0][i]))
			}
		}
	}
}

// simulate runs the plan of every rank over an in-memory network in lock
// step: all sends of a step are snapshotted, then all receives applied. The
// transport's pipelining only reorders work between independent chunks, so
// it must produce exactly these bits.
func simulate(t *testing.T, inputs [][]float32, chunk int, kind Op, bf16 bool) [][]float32 {
	t.Helper()
	return simulatePart(t, inputs, chunk, kind, bf16, partAll)
}

// simulatePart is simulate for the steps of one part of the schedule; the
// inputs are the buffers as that part finds them.
func simulatePart(t *testing.T, inputs [][]float32, chunk int, kind Op, bf16 bool, k part) [][]float32 {
	t.Helper()
	n := len(inputs)
	bufs := make([][]float32, n)
	plans := make([]Plan, n)
	for r := range bufs {
		bufs[r] = append([]float32(nil), inputs[r]...)
		p, err := NewPlan(n, r, len(inputs[r]), chunk)
		if err != nil {
			t.Fatal(err)
		}
		plans[r] = p
	}
	first, end := plans[0].StepRange(k)
	for s := first; s < end; s++ {
		type msg struct {
			to, j int
			data  []float32
		}
		var msgs []msg
		for r := 0; r < n; r++ {
			p := plans[r]
			for j := 0; j < p.Chunks; j++ {
				lo, hi := p.Chunk(p.SendSegment(s), j)
				d := append([]float32(nil), bufs[r][lo:hi]...)
				if bf16 {
					roundBF16(d)
				}
				msgs = append(msgs, msg{to: (r + 1) % n, j: j, data: d})
			}
		}
		for _, m := range msgs {
			p := plans[m.to]
			lo, hi := p.Chunk(p.RecvSegment(s), m.j)
			if hi-lo != len(m.data) {
				t.Fatalf("step %d chunk %d: rank %d expects %d elements, got %d", s, m.j, m.to, hi-lo, len(m.data))
			}
			dst := bufs[m.to][lo:hi]
			for i, v := range m.data {
				if p.IsReduce(s) {
					dst[i] += v
				} else {
					dst[i] = v
				}
			}
			if p.Finishes(s) {
				finish(dst, kind, n, bf16)
			}
		}
	}
	return bufs
}

func TestPlanSimulated(t *testing.T) {
	for n := 1; n <= 8; n++ {
		for _, chunk := range []int{1, 3, 64} {
			for _, l := range oddLengths(n, chunk) {
				for _, kind := range []Op{Sum, Avg} {
					for _, bf16 := range []bool{false, true} {
						if n == 1 && bf16 {
							continue
						}
						name := fmt.Sprintf("n%d/chunk%d/len%d/op%d/bf16=%v", n, chunk, l, kind, bf16)
						t.Run(name, func(t *testing.T) {
							in := seededInputs(1, n, l)
							got := simulate(t, in, chunk, kind, bf16)
							checkResults(t, in, got, kind, bf16)
						})
					}
				}
			}
		}
	}
}

// TestPlanHalvesSimulated: the reduce-scatter half leaves each rank's owned
// segment with the bits the whole all-reduce gives it, and the all-gather
// half, started from nothing but the owned segments (every other element a
// NaN guard), gives every rank the whole all-reduce's bits.
func TestPlanHalvesSimulated(t *testing.T) {
	for n := 1; n <= 6; n++ {
		for _, chunk := range []int{1, 3, 64} {
			for _, l := range oddLengths(n, chunk) {
				for _, kind := range []Op{Sum, Avg} {
					for _, bf16 := range []bool{false, true} {
						if n == 1 && bf16 {
							continue
						}
						in := seededInputs(2, n, l)
						whole := simulate(t, in, chunk, kind, bf16)
						rs := simulatePart(t, in, chunk, kind, bf16, partReduceScatter)
						guarded := make([][]float32, n)
						for r := range rs {
							p, _ := NewPlan(n, r, l, chunk)
							lo, hi := p.Segment(p.Owned())
							if !slices.Equal(f32Bits(rs[r][lo:hi]), f32Bits(whole[r][lo:hi])) {
								t.Fatalf("n%d/chunk%d/len%d/op%d/bf16=%v: rank %d's reduce-scatter segment differs from the all-reduce's",
									n, chunk, l, kind, bf16, r)
							}
							guarded[r] = make([]float32, l)
							for i := range guarded[r] {
								guarded[r][i] = float32(math.NaN())
							}
							copy(guarded[r][lo:hi], rs[r][lo:hi])
						}
						ag := simulatePart(t, guarded, chunk, kind, bf16, partAllGather)
						for r := range ag {
							if !slices.Equal(f32Bits(ag[r]), f32Bits(whole[r])) {
								t.Fatalf("n%d/chunk%d/len%d/op%d/bf16=%v: rank %d after the all-gather differs from the all-reduce",
									n, chunk, l, kind, bf16, r)
							}
						}
					}
				}
			}
		}
	}
}

func f32Bits(xs []float32) []uint32 {
	out := make([]uint32, len(xs))
	for i, x := range xs {
		out[i] = math.Float32bits(x)
	}
	return out
}

// TestPlanSegments pins the schedule for 3 ranks: who sends and receives
// which segment at each step, and which segment each rank owns.
func TestPlanSegments(t *testing.T) {
	type row struct{ send, recv []int }
	want := map[int][]row{ // rank -> per step {send, recv}; steps 0,1 reduce, 2,3 gather
		0: {{[]int{0}, []int{2}}, {[]int{2}, []int{1}}, {[]int{1}, []int{0}}, {[]int{0}, []int{2}}},
		1: {{[]int{1}, []int{0}}, {[]int{0}, []int{2}}, {[]int{2}, []int{1}}, {[]int{1}, []int{0}}},
		2: {{[]int{2}, []int{1}}, {[]int{1}, []int{0}}, {[]int{0}, []int{2}}, {[]int{2}, []int{1}}},
	}
	for rank, rows := range want {
		p, err := NewPlan(3, rank, 10, 2)
		if err != nil {
			t.Fatal(err)
		}
		if p.Owned() != (rank+1)%3 {
			t.Errorf("rank %d owns %d", rank, p.Owned())
		}
		for s, w := range rows {
			if p.SendSegment(s) != w.send[0] || p.RecvSegment(s) != w.recv[0] {
				t.Errorf("rank %d step %d: send %d recv %d, want %d %d", rank, s, p.SendSegment(s), p.RecvSegment(s), w.send[0], w.recv[0])
			}
		}
		// Receiving at the last reduce step finishes the owned segment.
		if p.RecvSegment(p.N-2) != p.Owned() {
			t.Errorf("rank %d: last reduce step receives %d, owns %d", rank, p.RecvSegment(p.N-2), p.Owned())
		}
	}
	// Segments and chunks tile the buffer exactly.
	p, _ := NewPlan(3, 0, 10, 2)
	next := 0
	for k := 0; k < 3; k++ {
		for j := 0; j < p.Chunks; j++ {
			lo, hi := p.Chunk(k, j)
			if lo != next {
				t.Fatalf("segment %d chunk %d starts at %d, want %d", k, j, lo, next)
			}
			next = hi
		}
	}
	if next != 10 {
		t.Fatalf("chunks cover %d elements, want 10", next)
	}
}

func TestNewPlanRejects(t *testing.T) {
	for _, c := range []struct {
		name                 string
		n, rank, len, chunks int
	}{
		{"no ranks", 0, 0, 1, 1},
		{"rank too big", 2, 2, 1, 1},
		{"negative rank", 2, -1, 1, 1},
		{"negative length", 2, 0, -1, 1},
		{"zero chunk", 2, 0, 1, 0},
	} {
		if _, err := NewPlan(c.n, c.rank, c.len, c.chunks); err == nil {
			t.Errorf("%s: no error", c.name)
		}
	}
}
