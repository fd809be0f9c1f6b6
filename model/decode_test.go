package model

import (
	"math"
	"math/rand/v2"
	"strings"
	"testing"
)

// decodeT is long enough for every path of gradConfig's windows (w_c = w_f =
// C = 4, δ = 3): memory tokens are visible from position 12 on, the memory
// (M = 3) evicts, and the trailing chunk (24..26) is incomplete.
const decodeT = 4*6 + 3

// decodeCases are the mixer families of docs/model.md §1 at gradient-check size.
var decodeCases = []struct {
	name   string
	mixers []string
	tweak  func(*Config)
}{
	{"bmojo", []string{MixerBMOJO, MixerBMOJO}, nil},
	{"bmojo-memory-rope-none", []string{MixerBMOJO, MixerBMOJO}, func(c *Config) { c.MemoryRope = "none" }},
	{"bmojo-f", []string{MixerBMOJO, MixerBMOJO}, func(c *Config) { c.Memory = 0 }},
	{"bmojo-grouped-heads-no-mlp", []string{MixerBMOJO}, func(c *Config) {
		c.NHead, c.NKVHead, c.DFF, c.Chunk, c.SelectPerChunk, c.Memory = 4, 2, 0, 2, 1, 5
	}},
	{"mamba", []string{MixerMamba, MixerMamba}, func(c *Config) { c.DFF = 0 }},
	{"swa", []string{MixerAttention, MixerAttention}, func(c *Config) { c.FadingWindow = 0 }},
	{"hybrid", []string{MixerMamba, MixerAttention}, nil},
}

func decodeConfig(t *testing.T, i int) Config {
	t.Helper()
	tc := decodeCases[i]
	c := gradConfig(tc.mixers...)
	if tc.tweak != nil {
		tc.tweak(&c)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	return c
}

// fullLogits runs the full-sequence reference (Model[float32] on kernels/cpu).
func fullLogits(t *testing.T, m *Model[float32], tokens []int32) []float32 {
	t.Helper()
	if err := m.Prepare(1, len(tokens)); err != nil {
		t.Fatal(err)
	}
	if err := m.ForwardLogits(tokens); err != nil {
		t.Fatal(err)
	}
	return m.Logits()
}

func argmax(x []float32) int32 {
	best := 0
	for i, v := range x {
		if v > x[best] {
			best = i
		}
	}
	return int32(best)
}

func TestDecoderMatchesFullForward(t *testing.T) {
	const tol = 2e-4
	for i, tc := range decodeCases {
		t.Run(tc.name, func(t *testing.T) {
			c := decodeConfig(t, i)
			m := newModel[float32](t, c, 21, 1, decodeT)
			dec, err := NewDecoder(c, m.ParamsHost())
			if err != nil {
				t.Fatal(err)
			}
			V := c.VocabSize

			// Teacher-forced: every position's logits.
			tokens, _ := randomBatch(31, 1, decodeT, V)
			want := fullLogits(t, m, tokens)
			var worst float64
			for pos, tok := range tokens {
				got, err := dec.Step(tok)
				if err != nil {
					t.Fatal(err)
				}
				if dec.Pos() != pos+1 {
					t.Fatalf("Pos() = %d after %d tokens", dec.Pos(), pos+1)
				}
				for v := range V {
					worst = math.Max(worst, math.Abs(float64(got[v]-want[pos*V+v])))
				}
				if worst > tol {
					t.Fatalf("position %d: logits differ from the full forward pass by %.3g > %g", pos, worst, tol)
				}
			}
			t.Logf("max |decoder − forward| over %d positions: %.2g", decodeT, worst)
			if c.HasMemory() && c.Mixers[0] == MixerBMOJO && dec.MemoryLen(0) != c.Memory {
				t.Fatalf("memory holds %d entries after %d tokens, want M = %d", dec.MemoryLen(0), decodeT, c.Memory)
			}

			// Reset replays the same sequence bit for bit.
			first := make([]float32, V)
			dec.Reset()
			for pos, tok := range tokens {
				got, err := dec.Step(tok)
				if err != nil {
					t.Fatal(err)
				}
				if pos == 0 {
					copy(first, got)
				}
				for v := range V {
					if math.Abs(float64(got[v]-want[pos*V+v])) > tol {
						t.Fatalf("after Reset, position %d differs from the full forward pass", pos)
					}
				}
			}

			// Greedy generation after a random prompt (so the continuation
			// is not one repeated token): the decoder's argmax continuation
			// must be the full forward pass's argmax at every generated
			// position of the result.
			dec.Reset()
			const prompt = 6
			seq := append([]int32(nil), tokens[:prompt]...)
			var lg []float32
			for _, tok := range seq {
				if lg, err = dec.Step(tok); err != nil {
					t.Fatal(err)
				}
			}
			for len(seq) < decodeT {
				seq = append(seq, Sample(lg, 0, 0, nil))
				if lg, err = dec.Step(seq[len(seq)-1]); err != nil {
					t.Fatal(err)
				}
			}
			full := fullLogits(t, m, seq)
			for pos := prompt - 1; pos+1 < len(seq); pos++ {
				if g := argmax(full[pos*V : (pos+1)*V]); g != seq[pos+1] {
					t.Fatalf("greedy position %d: decoder chose %d, full forward argmax is %d (sequence %v)", pos+1, seq[pos+1], g, seq)
				}
			}
			distinct := map[int32]bool{}
			for _, s := range seq {
				distinct[s] = true
			}
			t.Logf("greedy sequence (%d distinct tokens): %v", len(distinct), seq)
		})
	}
}

// TestDecoderLongSequences checks, teacher-forced, sequences far past every
// window with windows, chunks and heads that do not line up, and innovation
// ties (a zero predictor and a repeated token make equal scores inside a
// chunk, so the later-position-wins rule decides the memory).
func TestDecoderLongSequences(t *testing.T) {
	cases := []struct {
		name     string
		tweak    func(*Config)
		T        int
		zeroPred bool
		tokens   func(r *rand.Rand, T, V int) []int32
	}{
		{"misaligned windows", func(c *Config) {
			c.Window, c.FadingWindow, c.Chunk, c.SelectPerChunk, c.Memory, c.SeqLen = 5, 2, 3, 2, 4, 12
		}, 101, false, nil},
		{"misaligned windows, memory rope none", func(c *Config) {
			c.Window, c.FadingWindow, c.Chunk, c.SelectPerChunk, c.Memory, c.SeqLen = 3, 6, 5, 3, 7, 15
			c.MemoryRope = "none"
		}, 97, false, nil},
		{"innovation ties", nil, 4*8 + 2, true, func(r *rand.Rand, T, V int) []int32 {
			out := make([]int32, T)
			for i := 0; i < T; i += 4 {
				x, y := int32(r.IntN(V)), int32(r.IntN(V))
				for j := i; j < min(i+4, T); j++ {
					out[j] = y
				}
				out[i] = x
			}
			return out
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := gradConfig(MixerBMOJO, MixerBMOJO)
			if tc.tweak != nil {
				tc.tweak(&c)
			}
			if err := c.Validate(); err != nil {
				t.Fatal(err)
			}
			m := newModel[float32](t, c, 8, 1, tc.T)
			params := m.ParamsHost()
			if tc.zeroPred {
				for _, ts := range m.Layout.Tensors {
					if strings.HasSuffix(ts.Name, "predictor.weight") {
						clear(params[ts.Offset : ts.Offset+ts.Size()])
					}
				}
				if err := m.SetParams(params); err != nil {
					t.Fatal(err)
				}
			}
			r := rand.New(rand.NewPCG(12, 13))
			var tokens []int32
			if tc.tokens != nil {
				tokens = tc.tokens(r, tc.T, c.VocabSize)
			} else {
				tokens, _ = randomBatch(14, 1, tc.T, c.VocabSize)
			}
			want := fullLogits(t, m, tokens)
			dec, err := NewDecoder(c, params)
			if err != nil {
				t.Fatal(err)
			}
			V := c.VocabSize
			for pos, tok := range tokens {
				got, err := dec.Step(tok)
				if err != nil {
					t.Fatal(err)
				}
				if d := maxAbsDiff(got, want[pos*V:(pos+1)*V]); d > 2e-4 {
					t.Fatalf("position %d: logits differ from the full forward pass by %.3g", pos, d)
				}
			}
		})
	}
}

// TestDecoderMemoryMatters guards the equality test against a vacuous
// memory path: with visible memory tokens, bmojo and bmojo-f decoders on the
// same weights must differ, and before any is visible they must agree.
func TestDecoderMemoryMatters(t *testing.T) {
	c := gradConfig(MixerBMOJO, MixerBMOJO)
	cf := c
	cf.Memory = 0
	mb := newModel[float32](t, c, 5, 1, decodeT)
	mf := newModel[float32](t, cf, 6, 1, decodeT)
	copyByName(t, mf, mb)
	db, err := NewDecoder(c, mb.ParamsHost())
	if err != nil {
		t.Fatal(err)
	}
	df, err := NewDecoder(cf, mf.ParamsHost())
	if err != nil {
		t.Fatal(err)
	}
	tokens, _ := randomBatch(9, 1, decodeT, c.VocabSize)
	visible := c.MemoryDelay() * c.Chunk
	for pos, tok := range tokens {
		lb, err := db.Step(tok)
		if err != nil {
			t.Fatal(err)
		}
		lf, err := df.Step(tok)
		if err != nil {
			t.Fatal(err)
		}
		d := maxAbsDiff(lb, lf)
		switch {
		case pos < visible && d != 0:
			t.Fatalf("position %d: no memory is visible yet but bmojo and bmojo-f differ by %g", pos, d)
		case pos >= visible && d < 1e-6:
			t.Fatalf("position %d: visible memory changed nothing (diff %g)", pos, d)
		}
	}
}

func TestDecoderStateIsBounded(t *testing.T) {
	for i, tc := range decodeCases {
		t.Run(tc.name, func(t *testing.T) {
			c := decodeConfig(t, i)
			params := InitParams(c, NewLayout(c), 1)
			dec, err := NewDecoder(c, params)
			if err != nil {
				t.Fatal(err)
			}
			// The bound of the doc comment, per layer.
			GD := c.NKVHead * c.HeadDim
			bound := 0
			for _, m := range c.Mixers {
				if m != MixerAttention {
					bound += (c.DConv-1)*c.DInner + c.DInner*c.DState
				}
				if m != MixerMamba {
					bound += 2 * c.Window * GD
				}
				if m == MixerBMOJO {
					bound += 2 * (c.Window + c.FadingWindow) * GD
					if c.HasMemory() {
						bound += c.DModel + c.Chunk*(2*GD+1) + 2*c.MemoryDelay()*c.SelectPerChunk*GD + 2*c.Memory*GD
					}
				}
			}
			start := dec.StateFloats()
			if start > bound {
				t.Fatalf("state holds %d floats, the documented bound is %d", start, bound)
			}
			span := c.Window + c.FadingWindow + c.Chunk*c.MemoryDelay()
			r := rand.New(rand.NewPCG(4, 4))
			var after1 int
			for n := 1; n <= 10*span; n++ {
				if _, err := dec.Step(int32(r.IntN(c.VocabSize))); err != nil {
					t.Fatal(err)
				}
				if n == span {
					after1 = dec.StateFloats()
				}
			}
			if end := dec.StateFloats(); end != start || after1 != start {
				t.Fatalf("state grew: %d floats at start, %d after %d tokens, %d after %d", start, after1, span, end, 10*span)
			}
			if c.HasMemory() && c.Mixers[0] == MixerBMOJO && dec.MemoryLen(0) != c.Memory {
				t.Fatalf("memory holds %d entries, want M = %d", dec.MemoryLen(0), c.Memory)
			}
		})
	}
}

func TestDecoderRejectsBadInput(t *testing.T) {
	c := gradConfig(MixerBMOJO)
	p := InitParams(c, NewLayout(c), 1)
	if _, err := NewDecoder(c, p[:len(p)-1]); err == nil {
		t.Fatal("NewDecoder accepted a short parameter vector")
	}
	bad := c
	bad.Mixers = []string{"lstm"}
	if _, err := NewDecoder(bad, p); err == nil {
		t.Fatal("NewDecoder accepted an invalid config")
	}
	dec, err := NewDecoder(c, p)
	if err != nil {
		t.Fatal(err)
	}
	for _, tok := range []int32{-1, int32(c.VocabSize)} {
		if _, err := dec.Step(tok); err == nil {
			t.Fatalf("Step(%d) accepted a token outside the vocabulary", tok)
		}
	}
	if dec.Pos() != 0 {
		t.Fatalf("a rejected token advanced the position to %d", dec.Pos())
	}
}

func TestSample(t *testing.T) {
	nan := float32(math.NaN())
	cases := []struct {
		name   string
		logits []float32
		temp   float64
		topK   int
		want   int32
	}{
		{"argmax", []float32{0, 3, 1}, 0, 0, 1},
		{"argmax ties take the lowest id", []float32{2, 5, 5, 1}, 0, 0, 1},
		{"negative temperature is greedy", []float32{2, 5, 1}, -1, 0, 1},
		{"top-1 is greedy", []float32{2, 5, 9}, 1.5, 1, 2},
		{"NaN is never chosen", []float32{nan, 1, nan}, 0, 0, 1},
		{"NaN is never sampled", []float32{nan, 1, nan}, 1, 0, 1},
		{"-Inf is never sampled", []float32{float32(math.Inf(-1)), 0}, 5, 0, 1},
	}
	r := rand.New(rand.NewPCG(1, 2))
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for range 50 {
				if got := Sample(tc.logits, tc.temp, tc.topK, r); got != tc.want {
					t.Fatalf("Sample(%v, %v, %d) = %d, want %d", tc.logits, tc.temp, tc.topK, got, tc.want)
				}
			}
		})
	}
	if got := Sample(nil, 1, 0, r); got != -1 {
		t.Fatalf("Sample(nil) = %d, want -1", got)
	}
	// Frequencies follow softmax(logits/T) within the top k.
	logits := []float32{0, float32(math.Log(2)), float32(math.Log(3)), -1}
	const n = 60000
	counts := make([]int, len(logits))
	for range n {
		counts[Sample(logits, 1, 3, r)]++
	}
	if counts[3] != 0 {
		t.Fatalf("top-3 sampled the 4th-ranked token %d times", counts[3])
	}
	for i, w := range []float64{1.0 / 6, 2.0 / 6, 3.0 / 6} {
		if f := float64(counts[i]) / n; math.Abs(f-w) > 0.01 {
			t.Errorf("token %d sampled with frequency %.3f, want %.3f", i, f, w)
		}
	}
	// A high temperature flattens the distribution.
	clear(counts)
	for range n {
		counts[Sample([]float32{0, 1}, 100, 0, r)]++
	}
	if f := float64(counts[0]) / n; math.Abs(f-0.5) > 0.02 {
		t.Errorf("temperature 100: token 0 frequency %.3f, want ≈ 0.5", f)
	}
}

// BenchmarkDecoderStep measures streaming decode speed on the tiny presets.
func BenchmarkDecoderStep(b *testing.B) {
	for _, name := range []string{"bmojo-tiny", "bmojo-f-tiny", "mamba-tiny", "swa-tiny"} {
		b.Run(name, func(b *testing.B) {
			c, err := Preset(name)
			if err != nil {
				b.Fatal(err)
			}
			dec, err := NewDecoder(c, InitParams(c, NewLayout(c), 1))
			if err != nil {
				b.Fatal(err)
			}
			r := rand.New(rand.NewPCG(1, 1))
			// Warm up past every window so the memory is full.
			for range 4 * c.SeqLen {
				if _, err := dec.Step(int32(r.IntN(c.VocabSize))); err != nil {
					b.Fatal(err)
				}
			}
			b.ResetTimer()
			for range b.N {
				if _, err := dec.Step(int32(r.IntN(c.VocabSize))); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "tokens/s")
		})
	}
}
