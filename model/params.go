package model

import (
	"fmt"
	"math"
	"math/rand/v2"
)

// initKind says how a tensor is initialised (docs/model.md §3, §6).
type initKind int

const (
	initNormal   initKind = iota // N(0, 0.02)
	initResidual                 // N(0, 0.02/sqrt(2L)): W_o, W_out, W_down
	initOnes                     // norms, D
	initConvW                    // U(±1/sqrt(K)), PyTorch Conv1d default as in Mamba
	initConvB                    // U(±1/sqrt(K))
	initDtW                      // U(±R^-1/2)
	initDtBias                   // softplus⁻¹(dt), dt log-uniform in [1e-3, 1e-1], floored at 1e-4
	initALog                     // log(1..N) per row
)

// TensorSpec is one named parameter tensor (docs/model.md §7 names and shapes).
type TensorSpec struct {
	Name   string
	Shape  []int
	Offset int  // into the flat parameter vector
	Decay  bool // AdamW weight decay applies (matrices only)
	init   initKind
}

// Size is the element count of the tensor.
func (t TensorSpec) Size() int {
	n := 1
	for _, s := range t.Shape {
		n *= s
	}
	return n
}

// Layout is the ordered list of parameter tensors in one flat vector. The
// order is embedding, norm_f, then layers in order, so that reverse order is
// the order backward produces gradients (for bucketed all-reduce).
type Layout struct {
	Tensors []TensorSpec
	Total   int
	index   map[string]int
	layers  []int // offset where each layer's parameters start
}

// Lookup returns the tensor called name.
func (l *Layout) Lookup(name string) (TensorSpec, bool) {
	i, ok := l.index[name]
	if !ok {
		return TensorSpec{}, false
	}
	return l.Tensors[i], true
}

// NewLayout lists the parameters of c in docs/model.md §7 naming.
func NewLayout(c Config) *Layout {
	l := &Layout{index: map[string]int{}}
	add := func(name string, k initKind, decay bool, shape ...int) {
		t := TensorSpec{Name: name, Shape: shape, Offset: l.Total, Decay: decay, init: k}
		l.index[name] = len(l.Tensors)
		l.Tensors = append(l.Tensors, t)
		l.Total += t.Size()
	}
	d, E, N, R, K := c.DModel, c.DInner, c.DState, c.DtRank, c.DConv
	add("embed.weight", initNormal, false, c.VocabSize, d)
	add("norm_f.weight", initOnes, false, d)
	for i, m := range c.Mixers {
		p := fmt.Sprintf("layers.%d.", i)
		l.layers = append(l.layers, l.Total)
		add(p+"norm1.weight", initOnes, false, d)
		if m == MixerBMOJO || m == MixerMamba {
			add(p+"ssm.in_proj.weight", initNormal, true, 2*E, d)
			add(p+"ssm.conv.weight", initConvW, true, E, K)
			add(p+"ssm.conv.bias", initConvB, false, E)
			add(p+"ssm.x_proj.weight", initNormal, true, R+2*N, E)
			add(p+"ssm.dt_proj.weight", initDtW, true, E, R)
			add(p+"ssm.dt_proj.bias", initDtBias, false, E)
			add(p+"ssm.A_log", initALog, false, E, N)
			add(p+"ssm.D", initOnes, false, E)
			add(p+"ssm.out_proj.weight", initResidual, true, d, E)
		}
		if m == MixerBMOJO || m == MixerAttention {
			H, G, D := c.NHead, c.NKVHead, c.HeadDim
			add(p+"attn.q_proj.weight", initNormal, true, H*D, d)
			add(p+"attn.k_proj.weight", initNormal, true, G*D, d)
			add(p+"attn.v_proj.weight", initNormal, true, G*D, d)
			add(p+"attn.o_proj.weight", initResidual, true, d, H*D)
			if m == MixerBMOJO && c.HasMemory() {
				add(p+"attn.predictor.weight", initNormal, true, d, d)
			}
		}
		if c.HasMLP() {
			add(p+"norm2.weight", initOnes, false, d)
			add(p+"mlp.gate_proj.weight", initNormal, true, c.DFF, d)
			add(p+"mlp.up_proj.weight", initNormal, true, c.DFF, d)
			add(p+"mlp.down_proj.weight", initResidual, true, d, c.DFF)
		}
	}
	return l
}

// stacked returns the flat range of tensors a and b, which must be
// neighbours in that order (NewLayout puts W_gate right before W_up), as
// one matrix of both row blocks.
func (l *Layout) stacked(a, b string) (off, n int) {
	ta, okA := l.Lookup(a)
	tb, okB := l.Lookup(b)
	if !okA || !okB || tb.Offset != ta.Offset+ta.Size() {
		panic(fmt.Sprintf("model: %s and %s are not neighbours in the layout", a, b))
	}
	return ta.Offset, ta.Size() + tb.Size()
}

// InitParams fills a flat parameter vector for layout l with the docs/model.md
// initialisation, deterministically from seed.
func InitParams(c Config, l *Layout, seed uint64) []float64 {
	rng := rand.New(rand.NewPCG(seed, 0x62_6d_6f_6a_6f)) // "bmojo"
	out := make([]float64, l.Total)
	resid := 0.02 / math.Sqrt(2*float64(c.NLayer))
	for _, t := range l.Tensors {
		w := out[t.Offset : t.Offset+t.Size()]
		switch t.init {
		case initNormal:
			for i := range w {
				w[i] = 0.02 * rng.NormFloat64()
			}
		case initResidual:
			for i := range w {
				w[i] = resid * rng.NormFloat64()
			}
		case initOnes:
			for i := range w {
				w[i] = 1
			}
		case initConvW, initConvB:
			b := 1 / math.Sqrt(float64(c.DConv))
			for i := range w {
				w[i] = (2*rng.Float64() - 1) * b
			}
		case initDtW:
			b := 1 / math.Sqrt(float64(c.DtRank))
			for i := range w {
				w[i] = (2*rng.Float64() - 1) * b
			}
		case initDtBias:
			lo, hi := math.Log(1e-3), math.Log(1e-1)
			for i := range w {
				dt := math.Max(math.Exp(lo+rng.Float64()*(hi-lo)), 1e-4)
				w[i] = dt + math.Log(-math.Expm1(-dt)) // softplus⁻¹(dt) = log(exp(dt)−1)
			}
		case initALog:
			n := t.Shape[1]
			for i := range w {
				w[i] = math.Log(float64(i%n + 1))
			}
		}
	}
	return out
}

// LayerRange returns the flat range [off, off+n) of layer i's parameters;
// i = -1 is the embedding and the final norm, which come first. Backward
// finishes the ranges in the order L-1, ..., 0, -1 (BackwardHook), which is
// what lets data-parallel training reduce one while computing the next.
func (l *Layout) LayerRange(i int) (off, n int) {
	if i < 0 {
		if len(l.layers) == 0 {
			return 0, l.Total
		}
		return 0, l.layers[0]
	}
	end := l.Total
	if i+1 < len(l.layers) {
		end = l.layers[i+1]
	}
	return l.layers[i], end - l.layers[i]
}

// ParamCount is the number of trainable scalars.
func (l *Layout) ParamCount() int { return l.Total }
