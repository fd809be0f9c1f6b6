package model

import (
	"errors"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cpu"
)

// gradConfig is docs/model.md §5's gradient-check model: d = 16, L = 2, and a
// length of 4 chunks + 3 so that the context, fading and memory paths and an
// incomplete chunk all occur. Heads are grouped (H = 2, G = 1) to exercise
// the key/value head mapping.
func gradConfig(mixers ...string) Config {
	return Config{
		VocabSize: 13, DModel: 16, NLayer: len(mixers), NHead: 2, NKVHead: 1, HeadDim: 8,
		DInner: 24, DState: 4, DConv: 4, DtRank: 2, Expand: 2,
		Window: 4, FadingWindow: 4, Chunk: 4, SelectPerChunk: 2, Memory: 3,
		InnovationLoss: 0.5, DFF: 20, RopeTheta: 10000, MemoryRope: "absolute",
		Mixers: mixers, SeqLen: 16,
	}
}

const gradT = 4*4 + 3

func randomBatch(seed uint64, B, T, V int) (tokens, targets []int32) {
	r := rand.New(rand.NewPCG(seed, 1))
	tokens, targets = make([]int32, B*T), make([]int32, B*T)
	for i := range tokens {
		tokens[i] = int32(r.IntN(V))
		targets[i] = int32(r.IntN(V))
		if r.IntN(7) == 0 {
			targets[i] = -1 // masked labels, as in MQAR
		}
	}
	return tokens, targets
}

func newModel[F kernels.Float](t *testing.T, c Config, seed uint64, B, T int) *Model[F] {
	t.Helper()
	m, err := New[F](cpu.New[F](), c, seed)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if err := m.Prepare(B, T); err != nil {
		t.Fatalf("Prepare: %v", err)
	}
	// Replace the training init (tiny residual branches, Δ ≈ 0.01) by
	// unit-scale weights, so every path carries a gradient far above the
	// finite-difference noise floor and no gradient is accidentally zero.
	p := m.ParamsHost()
	r := rand.New(rand.NewPCG(seed, 2))
	for _, ts := range m.Layout.Tensors {
		w := p[ts.Offset : ts.Offset+ts.Size()]
		for i := range w {
			switch {
			case strings.HasSuffix(ts.Name, "A_log"):
				w[i] += 0.1 * r.NormFloat64()
			case strings.HasSuffix(ts.Name, "dt_proj.bias"):
				w[i] = 0.5 * r.NormFloat64()
			case len(ts.Shape) == 1:
				w[i] = 1 + 0.3*r.NormFloat64()
			default:
				w[i] = r.NormFloat64() / math.Sqrt(float64(ts.Shape[1]))
			}
		}
	}
	if err := m.SetParams(p); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestGradientsMatchFiniteDifferences(t *testing.T) {
	cases := []struct {
		name   string
		mixers []string
		tweak  func(*Config)
	}{
		{"bmojo", []string{MixerBMOJO, MixerBMOJO}, nil},
		{"bmojo-memory-rope-none", []string{MixerBMOJO, MixerBMOJO}, func(c *Config) { c.MemoryRope = "none" }},
		{"bmojo-f", []string{MixerBMOJO, MixerBMOJO}, func(c *Config) { c.Memory = 0 }},
		{"mamba", []string{MixerMamba, MixerMamba}, func(c *Config) { c.DFF = 0 }},
		{"swa", []string{MixerAttention, MixerAttention}, func(c *Config) { c.FadingWindow = 0 }},
		{"hybrid", []string{MixerMamba, MixerAttention}, nil},
	}
	const B = 2
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := gradConfig(tc.mixers...)
			if tc.tweak != nil {
				tc.tweak(&c)
			}
			tokens, targets := randomBatch(7, B, gradT, c.VocabSize)
			m64 := newModel[float64](t, c, 3, B, gradT)
			m32 := newModel[float32](t, c, 3, B, gradT)
			if err := m32.SetParams(m64.ParamsHost()); err != nil {
				t.Fatal(err)
			}
			grad := func(m interface {
				Forward([]int32, []int32) (Loss, error)
				Backward() error
				ZeroGrads()
				GradsHost() []float64
			}) []float64 {
				m.ZeroGrads()
				if _, err := m.Forward(tokens, targets); err != nil {
					t.Fatal(err)
				}
				if err := m.Backward(); err != nil {
					t.Fatal(err)
				}
				return m.GradsHost()
			}
			g64, g32 := grad(m64), grad(m32)
			base := m64.ParamsHost()
			// The innovation loss stops gradients at u and f (docs/model.md §4), so
			// the gradient of every tensor but the predictor is that of the
			// cross-entropy alone; the predictor's is that of the total.
			loss := func(p []float64, predictor bool) float64 {
				if err := m64.SetParams(p); err != nil {
					t.Fatal(err)
				}
				l, err := m64.Forward(tokens, targets)
				if err != nil {
					t.Fatal(err)
				}
				if predictor {
					return l.Total
				}
				return l.CE
			}
			r := rand.New(rand.NewPCG(11, 12))
			const eps = 1e-4
			for _, ts := range m64.Layout.Tensors {
				idx := make([]int, 0, 16)
				if ts.Size() <= 16 {
					for i := range ts.Size() {
						idx = append(idx, i)
					}
				} else {
					for range 16 {
						idx = append(idx, r.IntN(ts.Size()))
					}
				}
				var num, diff64, diff32 float64
				for _, i := range idx {
					j := ts.Offset + i
					// Five-point stencil: truncation error O(eps⁴).
					at := func(h float64) float64 {
						p := append([]float64(nil), base...)
						p[j] += h
						return loss(p, strings.HasSuffix(ts.Name, "predictor.weight"))
					}
					fd := (8*(at(eps)-at(-eps)) - (at(2*eps) - at(-2*eps))) / (12 * eps)
					num += fd * fd
					diff64 += (g64[j] - fd) * (g64[j] - fd)
					diff32 += (g32[j] - fd) * (g32[j] - fd)
				}
				if num == 0 {
					t.Errorf("%s: finite-difference gradient is exactly zero; the check proves nothing", ts.Name)
					continue
				}
				rel64, rel32 := math.Sqrt(diff64/num), math.Sqrt(diff32/num)
				if rel64 > 1e-6 {
					t.Errorf("%s: float64 gradient relative error %.3g > 1e-6", ts.Name, rel64)
				}
				if rel32 > 1e-3 {
					t.Errorf("%s: float32 gradient relative error %.3g > 1e-3 (docs/model.md §5)", ts.Name, rel32)
				}
			}
		})
	}
}

// copyByName copies every tensor dst shares (by name) from src.
func copyByName[F kernels.Float](t *testing.T, dst, src *Model[F]) {
	t.Helper()
	sp, dp := src.ParamsHost(), dst.ParamsHost()
	for _, ts := range dst.Layout.Tensors {
		ss, ok := src.Layout.Lookup(ts.Name)
		if !ok {
			continue
		}
		copy(dp[ts.Offset:ts.Offset+ts.Size()], sp[ss.Offset:ss.Offset+ss.Size()])
	}
	if err := dst.SetParams(dp); err != nil {
		t.Fatal(err)
	}
}

func maxAbsDiff[F kernels.Float](a, b []F) float64 {
	var m float64
	for i := range a {
		m = math.Max(m, math.Abs(float64(a[i]-b[i])))
	}
	return m
}

// TestSpecialCases checks docs/model.md §5's equalities between the paper's
// special cases on shared weights.
func TestSpecialCases(t *testing.T) {
	const B = 2
	t.Run("bmojo with no visible memory equals bmojo-f", func(t *testing.T) {
		// δ = 3 chunks of 4: a length of 12 never sees a memory token.
		c := gradConfig(MixerBMOJO, MixerBMOJO)
		cf := c
		cf.Memory = 0
		const T = 12
		mb := newModel[float64](t, c, 5, B, T)
		mf := newModel[float64](t, cf, 6, B, T)
		copyByName(t, mf, mb)
		tokens, _ := randomBatch(9, B, T, c.VocabSize)
		for _, m := range []*Model[float64]{mb, mf} {
			if err := m.ForwardLogits(tokens); err != nil {
				t.Fatal(err)
			}
		}
		if d := maxAbsDiff(mb.Logits(), mf.Logits()); d > 1e-12 {
			t.Fatalf("logits differ by %g", d)
		}
		// With a visible memory they must differ, or the check is vacuous.
		mb2 := newModel[float64](t, c, 5, B, gradT)
		mf2 := newModel[float64](t, cf, 6, B, gradT)
		copyByName(t, mf2, mb2)
		tokens2, _ := randomBatch(9, B, gradT, c.VocabSize)
		_ = mb2.ForwardLogits(tokens2)
		_ = mf2.ForwardLogits(tokens2)
		if d := maxAbsDiff(mb2.Logits(), mf2.Logits()); d < 1e-9 {
			t.Fatalf("memory tokens changed nothing (diff %g)", d)
		}
	})
	t.Run("bmojo-f with fading window 0 equals swa", func(t *testing.T) {
		c := gradConfig(MixerBMOJO, MixerBMOJO)
		c.Memory, c.FadingWindow = 0, 0
		cs := c
		cs.Mixers = []string{MixerAttention, MixerAttention}
		mb := newModel[float64](t, c, 5, B, gradT)
		ms := newModel[float64](t, cs, 6, B, gradT)
		copyByName(t, ms, mb)
		tokens, _ := randomBatch(9, B, gradT, c.VocabSize)
		_ = mb.ForwardLogits(tokens)
		_ = ms.ForwardLogits(tokens)
		if d := maxAbsDiff(mb.Logits(), ms.Logits()); d > 1e-12 {
			t.Fatalf("logits differ by %g", d)
		}
	})
}

func TestSameSeedSameLossCurve(t *testing.T) {
	run := func() []float64 {
		c, err := Preset("bmojo-tiny")
		if err != nil {
			t.Fatal(err)
		}
		m, err := New[float32](cpu.New[float32](), c, 1)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Prepare(2, c.SeqLen); err != nil {
			t.Fatal(err)
		}
		o := NewOptimizer(m, DefaultOptim(3e-3, 5))
		var losses []float64
		for range 5 {
			tokens, targets := randomBatch(100, 2, c.SeqLen, c.VocabSize)
			m.ZeroGrads()
			l, err := m.Forward(tokens, targets)
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Backward(); err != nil {
				t.Fatal(err)
			}
			o.Apply()
			losses = append(losses, l.Total)
		}
		return losses
	}
	a, b := run(), run()
	for i := range a {
		if math.Float64bits(a[i]) != math.Float64bits(b[i]) {
			t.Fatalf("step %d: loss %v then %v", i, a[i], b[i])
		}
	}
	if !(a[len(a)-1] < a[0]) {
		t.Fatalf("loss did not fall on a repeated batch schedule: %v", a)
	}
}

func TestPresets(t *testing.T) {
	// Parameter counts with the byte vocabulary; docs/model.md §1 gives per-layer
	// counts ≈ 18.25d² (bmojo), 6.25d² (mamba), 12d² (attention).
	for _, f := range Families {
		for _, s := range Sizes {
			name := f + "-" + s
			c, err := Preset(name)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if err := c.Validate(); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			l := NewLayout(c)
			d := float64(c.DModel)
			extra := 0 // docs/model.md's per-layer figures leave out the predictor
			if c.HasMemory() {
				extra = c.NLayer * c.DModel * c.DModel
			}
			perLayer := float64(l.Total-extra-c.VocabSize*c.DModel-c.DModel) / float64(c.NLayer) / (d * d)
			want := map[string]float64{"bmojo": 18.25, "bmojo-f": 18.25, "mamba": 6.25, "swa": 12, "transformer": 12}[f]
			// The figures leave out x_proj, dt_proj and A_log, a few percent at
			// d = 256 and less above.
			if want > 0 && (s == "130m" || s == "370m") && math.Abs(perLayer-want)/want > 0.06 {
				t.Errorf("%s: %.2f·d² parameters per layer, docs/model.md says ≈ %.2f·d²", name, perLayer, want)
			}
		}
	}
	if c, _ := Preset("bmojo"); c.DModel != 256 || c.Memory != 128 || c.MemoryDelay() != 3 {
		t.Errorf("bmojo (small) preset: d=%d M=%d δ=%d", c.DModel, c.Memory, c.MemoryDelay())
	}
}

func TestConfigErrorsNameTheField(t *testing.T) {
	base, _ := Preset("bmojo-tiny")
	cases := []struct {
		name  string
		tweak func(*Config)
		want  string
	}{
		{"zero d_model", func(c *Config) { c.DModel = 0 }, "d_model"},
		{"negative memory", func(c *Config) { c.Memory = -1 }, "memory"},
		{"unknown mixer", func(c *Config) { c.Mixers[0] = "lstm" }, "mixers[0]"},
		{"heads not grouping", func(c *Config) { c.NKVHead = 3 }, "n_kv_head"},
		{"window longer than sequence", func(c *Config) { c.Window = 4096 }, "window"},
		{"chunk not dividing", func(c *Config) { c.Chunk = 30 }, "chunk"},
		{"mixer count", func(c *Config) { c.NLayer = 3 }, "n_layer"},
		{"memory rope", func(c *Config) { c.MemoryRope = "relative" }, "memory_rope"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := base
			c.Mixers = append([]string(nil), base.Mixers...)
			tc.tweak(&c)
			err := c.Validate()
			if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an ErrConfig naming %q", err, tc.want)
			}
		})
	}
	if _, err := Preset("gpt5-tiny"); err == nil || !strings.Contains(err.Error(), "gpt5-tiny") {
		t.Fatalf("unknown preset: %v", err)
	}
}
