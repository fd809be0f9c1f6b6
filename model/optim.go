package model

import (
	"fmt"
	"math"

	"github.com/bmojo/bmojo/kernels"
)

// OptimConfig is the optimiser and schedule of docs/model.md §6.
type OptimConfig struct {
	LR          float64 `json:"lr" yaml:"lr"`                     // peak learning rate
	MinLRFrac   float64 `json:"min_lr_frac" yaml:"min_lr_frac"`   // cosine floor as a fraction of LR (0.1)
	WarmupSteps int     `json:"warmup_steps" yaml:"warmup_steps"` // linear warm-up length
	TotalSteps  int     `json:"total_steps" yaml:"total_steps"`   // schedule length
	Beta1       float64 `json:"beta1" yaml:"beta1"`               // 0.9
	Beta2       float64 `json:"beta2" yaml:"beta2"`               // 0.95
	Eps         float64 `json:"eps" yaml:"eps"`                   // 1e-8
	WeightDecay float64 `json:"weight_decay" yaml:"weight_decay"` // 0.1, matrices only
	ClipNorm    float64 `json:"clip_norm" yaml:"clip_norm"`       // global gradient norm limit (1.0; 0 = off)
}

// DefaultOptim returns docs/model.md §6's defaults for a run of total steps.
func DefaultOptim(lr float64, total int) OptimConfig {
	return OptimConfig{LR: lr, MinLRFrac: 0.1, WarmupSteps: max(1, total/20), TotalSteps: total,
		Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, WeightDecay: 0.1, ClipNorm: 1}
}

// LRAt is the learning rate of 0-based step s: linear warm-up, then cosine
// decay to MinLRFrac·LR at TotalSteps.
func (o OptimConfig) LRAt(s int) float64 {
	if s < o.WarmupSteps {
		return o.LR * float64(s+1) / float64(o.WarmupSteps)
	}
	span := o.TotalSteps - o.WarmupSteps
	if span <= 0 {
		return o.LR
	}
	p := math.Min(1, float64(s-o.WarmupSteps)/float64(span))
	min := o.LR * o.MinLRFrac
	return min + 0.5*(o.LR-min)*(1+math.Cos(math.Pi*p))
}

// Optimizer is AdamW with per-tensor decay groups over a model's flat
// parameter vector.
type Optimizer[F kernels.Float] struct {
	Cfg  OptimConfig
	M, V kernels.Buffer // moments, Layout order
	Step int            // completed updates
	m    *Model[F]
}

// NewOptimizer allocates zeroed moments for m.
func NewOptimizer[F kernels.Float](m *Model[F], c OptimConfig) *Optimizer[F] {
	be := m.Backend()
	return &Optimizer[F]{Cfg: c, M: be.Alloc(m.Layout.Total), V: be.Alloc(m.Layout.Total), m: m}
}

// StepResult reports one update.
type StepResult struct {
	GradNorm float64 // before clipping
	LR       float64
	Skipped  bool // gradient was NaN/Inf: nothing applied
}

// Apply clips the model's gradients to the global norm and takes one AdamW
// step at the scheduled learning rate. A non-finite gradient norm skips the
// update (the step counter does not advance).
func (o *Optimizer[F]) Apply() StepResult {
	m, be := o.m, o.m.Backend()
	norm := m.GradNorm()
	r := StepResult{GradNorm: norm, LR: o.Cfg.LRAt(o.Step)}
	if math.IsNaN(norm) || math.IsInf(norm, 0) {
		r.Skipped = true
		return r
	}
	scale := 1.0 // clipping: AdamW reads the gradients scaled
	if o.Cfg.ClipNorm > 0 && norm > o.Cfg.ClipNorm {
		scale = o.Cfg.ClipNorm / norm
	}
	o.Step++
	// The update is elementwise and tensors lie back to back in Layout
	// order: each run of neighbours with the same decay is one segment, and
	// all of them are one call (on a GPU one launch, a multi-tensor apply).
	runs := decayRuns(m.Layout)
	segs := make([]kernels.AdamWSegment, len(runs))
	for i, run := range runs {
		segs[i] = kernels.AdamWSegment{Off: run.off, N: run.n}
		if run.decay {
			segs[i].WeightDecay = o.Cfg.WeightDecay
		}
	}
	be.AdamWSteps(m.Params, m.Grads, o.M, o.V, segs, kernels.AdamW{
		LR: r.LR, Beta1: o.Cfg.Beta1, Beta2: o.Cfg.Beta2, Eps: o.Cfg.Eps, Step: o.Step, GradScale: scale,
	})
	return r
}

// paramRun is a range of the flat parameter buffer whose tensors share one
// weight-decay setting.
type paramRun struct {
	off, n int
	decay  bool
}

// decayRuns splits the layout into maximal runs of neighbouring tensors
// with the same Decay.
func decayRuns(l *Layout) []paramRun {
	var runs []paramRun
	for _, t := range l.Tensors {
		if k := len(runs) - 1; k >= 0 && runs[k].decay == t.Decay && runs[k].off+runs[k].n == t.Offset {
			runs[k].n += t.Size()
			continue
		}
		runs = append(runs, paramRun{t.Offset, t.Size(), t.Decay})
	}
	return runs
}

// MomentsF32 downloads the AdamW moments as float32 in Layout order, the
// precision checkpoints store.
func (o *Optimizer[F]) MomentsF32() (m, v []float32) {
	be := o.m.Backend()
	return downloadF32(be, o.M), downloadF32(be, o.V)
}

// SetMomentsF32 uploads float32 AdamW moments (Layout order) and the count
// of applied updates, as a checkpoint holds them.
func (o *Optimizer[F]) SetMomentsF32(m, v []float32, step int) error {
	if step < 0 {
		return fmt.Errorf("model: optimizer step %d is negative", step)
	}
	be := o.m.Backend()
	for _, p := range []struct {
		dst kernels.Buffer
		src []float32
	}{{o.M, m}, {o.V, v}} {
		if len(p.src) != p.dst.Len() {
			return fmt.Errorf("model: %d optimizer moments given, layout has %d", len(p.src), p.dst.Len())
		}
		be.Upload(p.dst, fromF32[F](p.src))
	}
	o.Step = step
	return be.Err()
}
