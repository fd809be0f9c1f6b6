package experiment

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/bmojo/bmojo/experiment/mqar"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/model"
)

// ErrBudget: the sweep's estimated device time exceeds --budget.
var ErrBudget = errors.New("sweep does not fit the budget")

// RunCell runs one cell from scratch (any checkpoint of an interrupted
// earlier attempt is removed first) and stores its result in the cache.
func RunCell(ctx context.Context, env Env, c Cell) (Result, error) {
	if _, err := env.Cache.Begin(c); err != nil {
		return Result{}, err
	}
	if err := os.RemoveAll(env.Cache.CheckpointDir(c)); err != nil {
		return Result{}, fmt.Errorf("experiment: %s: clear old checkpoint: %w", c.Name(), err)
	}
	var r Result
	var err error
	switch c.Kind {
	case KindMQAR:
		r, err = RunMQAR(ctx, env, c)
	case KindLM:
		r, err = RunLM(ctx, env, c)
	default:
		err = fmt.Errorf("%w: unknown cell kind %q", ErrSpec, c.Kind)
	}
	if err != nil {
		return Result{}, err
	}
	return r, env.Cache.Store(r)
}

// Cost is a cell's estimated work.
type Cost struct {
	TrainTokens int64   // positions trained on (padding and prefixes included)
	EvalTokens  int64   // positions evaluated (forward only)
	Steps       int64   // training steps, plus evaluation batches counted as a third of a step
	FLOPs       float64 // model FLOPs (model.FLOPsPerToken; evaluation counted as a third of training)
}

// CellCost estimates a cell's work from its spec alone.
func CellCost(c Cell, vocab int) (Cost, error) {
	cfg, err := c.ModelConfig(vocab)
	if err != nil {
		return Cost{}, err
	}
	var k Cost
	var evalBatches int64
	switch c.Kind {
	case KindMQAR:
		// Each setting's batches run at its own length (RunMQAR).
		for _, m := range c.Mix {
			steps := int64((m.Examples+c.Batch-1)/c.Batch) * int64(c.Epochs)
			n := steps * int64(c.Batch) * int64(m.Setting.T)
			k.Steps += steps
			k.TrainTokens += n
			k.FLOPs += float64(n) * model.FLOPsPerToken(cfg, m.Setting.T)
		}
		for _, s := range c.Test {
			B := EvalBatch(s.T, cfg.VocabSize)
			b := int64((c.TestExamples + B - 1) / B)
			n := b * int64(B*s.T)
			evalBatches += b
			k.EvalTokens += n
			k.FLOPs += float64(n) * model.FLOPsPerToken(cfg, s.T) / 3
		}
	case KindLM:
		T := c.TrainT
		if c.StatePassing {
			T *= 2
		}
		k.Steps = int64(c.Steps)
		k.TrainTokens = int64(c.Steps) * int64(c.Batch) * int64(T)
		k.FLOPs = float64(k.TrainTokens) * model.FLOPsPerToken(cfg, T)
		for _, t := range c.EvalT {
			w := c.WindowsAt(t)
			if w == 0 {
				w = 64 // unknown without the data: assume a typical cap
			}
			n := int64(w) * int64(t)
			evalBatches += int64(w)
			k.EvalTokens += n
			k.FLOPs += float64(n) * model.FLOPsPerToken(cfg, t) / 3
		}
	}
	k.Steps += evalBatches / 3
	return k, nil
}

// Rate is a measured or given device speed, as a line: a fixed
// StepSeconds per step (kernel launches, host reads: what dominates the
// small models of MQAR on a GPU) plus the model FLOPs at TokensPerS
// tokens per second of a model doing FLOPsPerToken. With one probe, or a
// rate given, StepSeconds is 0 and time goes with model FLOPs alone.
type Rate struct {
	TokensPerS    float64
	FLOPsPerToken float64
	StepSeconds   float64
	Source        string // "measured on <cell>" or "given"
}

// Seconds is the estimated device time of a cost at this rate.
func (r Rate) Seconds(k Cost) float64 {
	return float64(k.Steps)*r.StepSeconds + k.FLOPs/(r.TokensPerS*r.FLOPsPerToken)
}

// Probe is one measured training step of a cell.
type Probe struct {
	Cell         string
	StepSeconds  float64 // wall time per step
	Tokens       int     // positions per step
	FLOPsPerStep float64 // model FLOPs per step
}

// RateFrom fits a Rate to probes: one probe puts all the time on the
// FLOPs; two with different FLOPs give the line through both (slope and
// intercept clamped at 0).
func RateFrom(ps ...Probe) (Rate, error) {
	if len(ps) == 0 || len(ps) > 2 {
		return Rate{}, fmt.Errorf("%w: a rate needs one or two probes, got %d", ErrSpec, len(ps))
	}
	a := ps[0]
	one := Rate{TokensPerS: float64(a.Tokens) / a.StepSeconds, FLOPsPerToken: a.FLOPsPerStep / float64(a.Tokens), Source: "measured on " + a.Cell}
	if len(ps) == 1 {
		return one, nil
	}
	b := ps[1]
	if b.FLOPsPerStep < a.FLOPsPerStep {
		a, b = b, a
	}
	if b.FLOPsPerStep <= a.FLOPsPerStep*1.01 || b.StepSeconds <= a.StepSeconds {
		// No slope to fit: the cheaper step costs as much; all fixed.
		return Rate{TokensPerS: math.Inf(1), FLOPsPerToken: 1, StepSeconds: max(a.StepSeconds, b.StepSeconds),
			Source: "measured on " + a.Cell + " and " + b.Cell + " (fixed cost per step)"}, nil
	}
	perFLOP := (b.StepSeconds - a.StepSeconds) / (b.FLOPsPerStep - a.FLOPsPerStep)
	fixed := max(0, a.StepSeconds-perFLOP*a.FLOPsPerStep)
	return Rate{TokensPerS: 1 / perFLOP, FLOPsPerToken: 1, StepSeconds: fixed,
		Source: "measured on " + a.Cell + " and " + b.Cell}, nil
}

// MeasureRate times steps training steps (after one warm-up step) of cell
// c's model on be and returns the rate that puts all the time on FLOPs.
func MeasureRate(ctx context.Context, be kernels.Backend[float32], c Cell, vocab, steps int) (Rate, error) {
	p, err := MeasureStep(ctx, be, c, vocab, steps)
	if err != nil {
		return Rate{}, err
	}
	return RateFrom(p)
}

// MeasureStep times steps training steps (after one warm-up step) of cell
// c's model on be: for MQAR, batches of its longest training setting with
// the labelled head, as RunMQAR trains; for LM, random tokens.
func MeasureStep(ctx context.Context, be kernels.Backend[float32], c Cell, vocab, steps int) (Probe, error) {
	cfg, err := c.ModelConfig(vocab)
	if err != nil {
		return Probe{}, err
	}
	T := c.MaxTrainT()
	if c.Kind == KindLM {
		T = c.TrainT
		if c.StatePassing {
			T *= 2
		}
	}
	m, err := model.New[float32](be, cfg, 1)
	if err != nil {
		return Probe{}, err
	}
	if err := m.Prepare(c.Batch, T); err != nil {
		return Probe{}, err
	}
	tok, tgt := make([]int32, c.Batch*T), make([]int32, c.Batch*T)
	if c.Kind == KindMQAR {
		var s mqar.Setting
		for _, e := range c.Mix {
			if e.Setting.T == T && e.Setting.K > s.K {
				s = e.Setting
			}
		}
		if err := (mqar.Source{Seed: c.Seed, Noise: c.Noise}).Fill(s, 0, c.Batch, tok, tgt); err != nil {
			return Probe{}, err
		}
		m.LabelledHead = true
	} else {
		for i := range tok {
			tok[i] = int32((i*7919 + 13) % cfg.VocabSize)
			tgt[i] = int32((i*104729 + 7) % cfg.VocabSize)
		}
	}
	opt := model.NewOptimizer(m, model.DefaultOptim(1e-4, steps+1))
	var t0 time.Time
	for s := range steps + 1 {
		if err := ctx.Err(); err != nil {
			return Probe{}, err
		}
		if s == 1 {
			t0 = time.Now()
		}
		if _, _, err := trainStep(m, opt, tok, tgt); err != nil {
			return Probe{}, err
		}
		_ = m.GradNorm() // a host read: the device has finished the step
	}
	if err := be.Err(); err != nil {
		return Probe{}, err
	}
	el := time.Since(t0).Seconds() / float64(steps)
	n := c.Batch * T
	return Probe{Cell: c.Name(), StepSeconds: el, Tokens: n, FLOPsPerStep: float64(n) * model.FLOPsPerToken(cfg, T)}, nil
}

// Extremes are the cells with the fewest and the most model FLOPs per
// training token: the two ends of the line RateFrom fits (the costliest
// alone when one probe is enough).
func Extremes(cells []Cell, vocab int) (cheapest, costliest Cell, err error) {
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, c := range cells {
		cfg, err := c.ModelConfig(vocab)
		if err != nil {
			return Cell{}, Cell{}, err
		}
		T := c.MaxTrainT()
		if c.Kind == KindLM {
			T = c.TrainT
		}
		f := model.FLOPsPerToken(cfg, T)
		if f < lo {
			cheapest, lo = c, f
		}
		if f > hi {
			costliest, hi = c, f
		}
	}
	if len(cells) == 0 {
		return Cell{}, Cell{}, fmt.Errorf("%w: no cells", ErrSpec)
	}
	return cheapest, costliest, nil
}

// Plan is what a sweep will run: the cells not yet cached, their estimate,
// and the ones dropped to fit the budget.
type Plan struct {
	Cached  []Cell
	Run     []Cell
	Dropped []Cell
	Seconds []float64 // estimate per Run cell
	Total   float64   // Σ Seconds
	FLOPs   float64   // Σ model FLOPs of the Run cells
	Tokens  int64     // Σ training tokens of the Run cells
	Rate    Rate
}

// NewPlan splits cells into cached and pending, estimates the pending ones
// at rate, and checks them against budget (0 = none): when they do not
// fit, fit keeps the cells that do, in order, and reports the others as
// dropped; without fit it is an ErrBudget error.
func NewPlan(k Cache, cells []Cell, vocab int, rate Rate, budget time.Duration, fit bool) (Plan, error) {
	p := Plan{Rate: rate}
	left := budget.Seconds()
	for _, c := range cells {
		if _, err := k.Load(c); err == nil {
			p.Cached = append(p.Cached, c)
			continue
		} else if !errors.Is(err, ErrNotCached) {
			return p, err
		}
		cost, err := CellCost(c, vocab)
		if err != nil {
			return p, err
		}
		s := rate.Seconds(cost)
		if budget > 0 && fit && s > left {
			p.Dropped = append(p.Dropped, c)
			continue
		}
		left -= s
		p.Run = append(p.Run, c)
		p.Seconds = append(p.Seconds, s)
		p.Total += s
		p.FLOPs += cost.FLOPs
		p.Tokens += cost.TrainTokens
	}
	if budget > 0 && !fit && p.Total > budget.Seconds() {
		return p, fmt.Errorf("%w: %d cells need about %s of device time (rate %s), the budget is %s; raise --budget, narrow the sweep, or pass --fit to run the cells that fit",
			ErrBudget, len(p.Run), time.Duration(p.Total*float64(time.Second)).Round(time.Second), rate.Source, budget)
	}
	return p, nil
}

// Executor runs one cell to completion (its result in the cache).
type Executor func(ctx context.Context, c Cell, slot int) error

// Execute runs cells on jobs executors at once. A cell that fails does
// not stop the others: once they have all run, each failed cell is
// retried once, alone (cells sharing a GPU can run it out of memory
// together), and Execute returns the errors of the cells that failed
// again, joined. done is called after each success. When ctx ends, no
// new cell starts and Execute returns ctx's error with the failures.
func Execute(ctx context.Context, cells []Cell, jobs int, run Executor, done func(Cell)) error {
	jobs = max(1, min(jobs, len(cells)))
	next := make(chan Cell)
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		failed []Cell
	)
	for slot := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range next {
				if err := run(ctx, c, slot); err != nil {
					mu.Lock()
					failed = append(failed, c)
					mu.Unlock()
					continue
				}
				if done != nil {
					done(c)
				}
			}
		}()
	}
feed:
	for _, c := range cells {
		select {
		case next <- c:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	var errs []error
	for _, c := range failed {
		if ctx.Err() != nil {
			errs = append(errs, fmt.Errorf("%s [%s]: not retried: %w", c.Name(), c.Hash(), ctx.Err()))
			continue
		}
		if err := run(ctx, c, 0); err != nil {
			errs = append(errs, fmt.Errorf("%s [%s]: failed twice, the second time alone: %w", c.Name(), c.Hash(), err))
			continue
		}
		if done != nil {
			done(c)
		}
	}
	if err := ctx.Err(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// MQARSweep is the MQAR experiment's cells: every family × d_model × lr on
// one training recipe (base), ordered by d_model, then family, then lr,
// so that a sweep cut short has whole lr sweeps of the small models.
func MQARSweep(base Cell, families []string, dModels []int, lrs []float64) []Cell {
	var out []Cell
	for _, d := range dModels {
		for _, f := range families {
			for _, lr := range lrs {
				c := base
				c.Model.Family, c.Model.DModel, c.LR = f, d, lr
				out = append(out, c)
			}
		}
	}
	return out
}

// DefaultTest is the Based test suite, up to (1024, 256).
var DefaultTest = []mqar.Setting{{T: 64, K: 4}, {T: 64, K: 8}, {T: 64, K: 16}, {T: 128, K: 32}, {T: 256, K: 64}, {T: 512, K: 128}, {T: 1024, K: 256}}

// The MQAR training defaults: the Based mix (experiments.md §1) at half
// its size, 8 epochs (Based trains 32) at Based's batch of 256: 2,812
// steps. A tenth of the mix for 4 epochs at batch 64 left full attention
// at 0.21 accuracy at d_model 64 (first GPU sweep, 2026-12-06).
const (
	DefaultMix    = "64:4:50000,128:8:10000,256:16:10000,256:32:10000,256:64:10000"
	DefaultEpochs = 8
	DefaultBatch  = 256
)

// DefaultLRs is the Based lr sweep.
var DefaultLRs = []float64{1e-3, 3.2e-3, 1e-2, 3.2e-2}

// BestByLR keeps, for each group (the cell with its lr zeroed), the result
// with the highest mean test accuracy; ties go to the lower lr.
func BestByLR(rs []Result) []Result {
	best := map[string]Result{}
	for _, r := range rs {
		k := r.Cell
		k.LR = 0
		h := k.Hash()
		if b, ok := best[h]; !ok || r.MeanAccuracy() > b.MeanAccuracy() || (r.MeanAccuracy() == b.MeanAccuracy() && r.Cell.LR < b.Cell.LR) {
			best[h] = r
		}
	}
	out := make([]Result, 0, len(best))
	for _, h := range sortedKeys(best) {
		out = append(out, best[h])
	}
	slices.SortStableFunc(out, func(a, b Result) int {
		if a.Cell.Model.DModel != b.Cell.Model.DModel {
			return a.Cell.Model.DModel - b.Cell.Model.DModel
		}
		return familyIndex(a.Cell.Model.Family) - familyIndex(b.Cell.Model.Family)
	})
	return out
}

func familyIndex(f string) int {
	if i := slices.Index(Families, f); i >= 0 {
		return i
	}
	return len(Families)
}
