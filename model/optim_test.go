package model

import (
	"math/rand/v2"
	"testing"

	"github.com/bmojo/bmojo/kernels/cpu"
)

// TestDecayRuns: one AdamW call per run of neighbouring tensors with the same
// decay covers every parameter exactly once with that tensor's decay.
func TestDecayRuns(t *testing.T) {
	for _, name := range []string{"bmojo-tiny", "hybrid-small", "mamba-130m"} {
		c, err := Preset(name)
		if err != nil {
			t.Fatal(err)
		}
		l := NewLayout(c)
		runs := decayRuns(l)
		covered := make([]int, l.Total)
		for i, r := range runs {
			if i > 0 && runs[i-1].decay == r.decay {
				t.Errorf("%s: runs %d and %d both have decay %v (not merged)", name, i-1, i, r.decay)
			}
			for j := r.off; j < r.off+r.n; j++ {
				covered[j]++
			}
		}
		for _, ts := range l.Tensors {
			for _, r := range runs {
				if ts.Offset >= r.off && ts.Offset < r.off+r.n && r.decay != ts.Decay {
					t.Errorf("%s: %s (decay %v) in a run with decay %v", name, ts.Name, ts.Decay, r.decay)
				}
			}
		}
		for j, k := range covered {
			if k != 1 {
				t.Fatalf("%s: parameter %d covered %d times", name, j, k)
			}
		}
		t.Logf("%s: %d tensors in %d AdamW calls", name, len(l.Tensors), len(runs))
	}
}

// TestClipping: Apply with a norm limit updates the parameters as scaling
// the gradients to the limit and applying without one does; the gradients
// themselves are left as they were.
func TestClipping(t *testing.T) {
	c, err := Preset("bmojo-tiny")
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	g := make([]float32, NewLayout(c).Total)
	for i := range g {
		g[i] = float32(rng.NormFloat64())
	}
	const limit = 0.5
	// scaled: the gradients are scaled to the limit before Apply.
	run := func(clip float64, scaled bool) (params, grads []float64) {
		m, err := New[float32](cpu.New[float32](), c, 1)
		if err != nil {
			t.Fatal(err)
		}
		m.be.Upload(m.Grads, g)
		if scaled {
			m.be.Scale(m.Grads, limit/m.GradNorm())
		}
		cfg := DefaultOptim(1e-2, 10)
		cfg.ClipNorm = clip
		r := NewOptimizer(m, cfg).Apply()
		if r.Skipped {
			t.Fatal("step skipped")
		}
		return m.ParamsHost(), m.GradsHost()
	}
	p, gr := run(limit, false)
	want, _ := run(0, true)
	for i := range p {
		if p[i] != want[i] {
			t.Fatalf("parameter %d: %v clipped in AdamW, %v from scaled gradients", i, p[i], want[i])
		}
	}
	for i := range gr {
		if gr[i] != float64(g[i]) {
			t.Fatalf("gradient %d changed: %v, was %v", i, gr[i], g[i])
		}
	}
	unclipped, _ := run(0, false)
	if unclipped[0] == p[0] && unclipped[1] == p[1] {
		t.Fatal("clipping changed nothing")
	}
}
