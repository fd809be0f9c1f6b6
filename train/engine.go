// Package train trains one replica of a job: Engine is the training step
// (this file), which the single-process run (train.go, `bmojo train
// --workers 0`) and every worker of a distributed job execute alike; Run is
// the single-process loop around it, cadence only: when to evaluate,
// checkpoint and report. It knows nothing of processes, networks or etcd.
package train

import (
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/data"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/model"
)

// Engine is the training step: the one piece of code that both the
// single-process run and every worker of a distributed job execute. The
// loops around it only decide when to evaluate, checkpoint and publish.
//
// A step is one global batch. Data step s covers sample positions
// [s·GB, (s+1)·GB) of the shuffled training stream, split over the
// replicas by data.BatchRange. Step counts the global batches consumed,
// whether or not the optimizer applied them: a step whose loss or gradient
// is not finite is consumed and skipped (Skipped counts those). The
// optimizer's own count, which drives AdamW's bias correction and the
// learning-rate schedule, is therefore Step − Skipped (Opt.Step).
type Engine struct {
	M     *model.Model[float32]
	Opt   *model.Optimizer[float32]
	Train *data.Sampler // the shuffled training stream
	Val   *data.Sampler // the validation windows, in order
	GB    int           // global batch: sequences per step, over all replicas
	// EvalBatches bounds a validation pass to EvalBatches·GB windows
	// (0 = every window).
	EvalBatches int

	Step    int // data steps consumed (see Engine)
	Skipped int // of those, steps the optimizer skipped

	tokens, targets []int32
}

// A Reducer sums what the replicas of one step computed. Within a process
// it does nothing (Local); in a distributed job it is the ring all-reduce.
type Reducer interface {
	// Rank and Size place this replica among Size (data.BatchRange).
	Rank() int
	Size() int
	// Start begins summing grads (a range of the model's gradient, the
	// parameters of one layer, see model.Layout.LayerRange) across the
	// replicas, each replica's first multiplied by scale. Backward calls it
	// as each layer's gradients become final, last layer first, so that the
	// sums overlap the rest of backward.
	Start(grads kernels.Buffer, scale float32)
	// Finish waits until every range started this step holds the sum.
	Finish() error
	// Sum returns the element-wise sums of xs over the replicas.
	Sum(xs []float64) ([]float64, error)
	// Err is nil while the replicas can still sum, else why not (a peer
	// failed): long local work polls it to stop early.
	Err() error
}

// CommTimer is a Reducer that times its collectives (the worker's ring).
// For the step the last Finish ended, comm is how long at least one of its
// gradient sums was in flight, ready when the last gradient range reached
// the reduction: a GPU backend's host queues backward's kernels ahead of
// the device, so Finish may first wait for backward itself, which is
// compute, not communication. TrainStep reports them as StepStats.Comm and
// Arrive.
type CommTimer interface {
	CommTimes() (comm time.Duration, ready time.Time)
}

// BatchObserver is a Reducer that keeps a ledger (the worker's): TrainStep
// shows it the batch this replica really trains on, after filling it and
// before the step's sums. The slices are the engine's and are refilled by
// the next step.
type BatchObserver interface {
	Batch(start, count int, tokens, targets []int32)
}

// Local is the Reducer of a single replica: every sum is the value itself.
type Local struct{}

var _ Reducer = Local{}

func (Local) Rank() int                           { return 0 }
func (Local) Size() int                           { return 1 }
func (Local) Start(kernels.Buffer, float32)       {}
func (Local) Finish() error                       { return nil }
func (Local) Sum(xs []float64) ([]float64, error) { return xs, nil }
func (Local) Err() error                          { return nil }

// StepStats reports one step.
type StepStats struct {
	Loss     float64 // the global batch's mean cross-entropy (nats/token); not finite if the step was skipped for it
	Aux      float64 // this replica's innovation-predictor loss (docs/model.md §4)
	Rows     int     // sequences this replica trained on
	Skipped  bool    // the optimizer did not apply the step
	GradNorm float64 // global gradient norm before clipping
	LR       float64 // learning rate applied

	Data, Compute, Wait, Optim time.Duration // where the step's time went
	Arrive                     time.Time     // the last gradient range entered the reduction (backward ended)

	// Comm is how long the step's gradient sums were in flight (CommTimer;
	// 0 for a Reducer that does not time them), Exposed how long Finish
	// kept the step waiting after Arrive: the communication backward did
	// not hide, and putting the sums back in place (Wait adds the loss sum
	// and the device's last queued work).
	Comm, Exposed time.Duration
}

// Hidden is the fraction of the communication hidden behind compute,
// 1 − Exposed/Comm, within [0, 1] (Exposed counts the uploads too, so it
// can pass Comm); 0 without communication.
func (s StepStats) Hidden() float64 {
	if s.Comm <= 0 {
		return 0
	}
	return min(1, max(0, 1-s.Exposed.Seconds()/s.Comm.Seconds()))
}

// ErrStep wraps errors of the step itself (data, shapes, the device), as
// opposed to the Reducer's: a caller may retry a step whose reduction
// failed, never one that ErrStep failed.
var ErrStep = errors.New("train step")

// TrainStep trains data step e.Step on this replica's share of the global
// batch, sums the gradient over the replicas, applies AdamW, and advances
// e.Step. On a Reducer error nothing is applied and e.Step is unchanged: the
// step can be run again (in a new ring).
//
// Each replica scales its gradient (of its own mean loss) by rows/GB before
// the sum, so the sum is the gradient of the global batch's mean loss when
// every position has a target, as training batches do.
func (e *Engine) TrainStep(r Reducer) (StepStats, error) {
	var st StepStats
	m := e.M
	T := m.Cfg.SeqLen
	start, count, err := data.BatchRange(e.Step, e.GB, r.Rank(), r.Size())
	if err != nil {
		return st, fmt.Errorf("%w: %w", ErrStep, err)
	}
	st.Rows = count
	scale := float32(1)
	if count != e.GB {
		scale = float32(float64(count) / float64(e.GB))
	}
	be := m.Backend()
	layer := func(i int) kernels.Buffer {
		off, n := m.Layout.LayerRange(i)
		return be.Slice(m.Grads, off, n)
	}
	m.ZeroGrads()
	var local float64
	t0 := time.Now()
	if count > 0 {
		if err := m.Prepare(count, T); err != nil {
			return st, fmt.Errorf("%w: %w", ErrStep, err)
		}
		if cap(e.tokens) < count*T {
			e.tokens, e.targets = make([]int32, count*T), make([]int32, count*T)
		}
		tokens, targets := e.tokens[:count*T], e.targets[:count*T]
		if err := e.Train.Fill(0, start, count, tokens, targets); err != nil {
			return st, fmt.Errorf("%w: step %d: %w", ErrStep, e.Step, err)
		}
		if o, ok := r.(BatchObserver); ok {
			o.Batch(start, count, tokens, targets)
		}
		st.Data = time.Since(t0)
		l, err := m.Forward(tokens, targets)
		if err != nil {
			return st, fmt.Errorf("%w: step %d: %w", ErrStep, e.Step, err)
		}
		// The reported loss is the language-model cross-entropy (what the
		// validation loss measures); λ·aux only trains the innovation
		// predictor. A non-finite total still marks the step as skipped.
		local, st.Aux = l.CE, l.Aux
		if math.IsNaN(l.Total) || math.IsInf(l.Total, 0) {
			local = l.Total
		}
		if err := m.BackwardHook(func(i int) { r.Start(layer(i), scale) }); err != nil {
			return st, fmt.Errorf("%w: step %d: %w", ErrStep, e.Step, err)
		}
	} else {
		// More replicas than sequences: contribute zeros, in backward's order.
		for i := len(m.Cfg.Mixers) - 1; i >= -1; i-- {
			r.Start(layer(i), 1)
		}
	}
	t1 := time.Now()
	err = r.Finish()
	t2 := time.Now()
	arrive := t1
	if ct, ok := r.(CommTimer); ok {
		var ready time.Time
		if st.Comm, ready = ct.CommTimes(); ready.After(arrive) {
			arrive = ready // Finish waited for backward's own kernels first
		}
	}
	st.Compute, st.Arrive, st.Exposed = arrive.Sub(t0)-st.Data, arrive, max(0, t2.Sub(arrive))
	if err == nil {
		var sums []float64
		if sums, err = r.Sum([]float64{local * float64(scale)}); err == nil {
			st.Loss = sums[0]
		}
	}
	st.Wait = time.Since(arrive)
	if err != nil {
		return st, err
	}
	if err := be.Err(); err != nil {
		return st, fmt.Errorf("%w: step %d: %w", ErrStep, e.Step, err)
	}
	to := time.Now()
	res := e.Opt.Apply()
	st.Optim = time.Since(to)
	st.GradNorm, st.LR = res.GradNorm, res.LR
	st.Skipped = res.Skipped || math.IsNaN(st.Loss) || math.IsInf(st.Loss, 0)
	e.Step++
	if st.Skipped {
		e.Skipped++
	}
	return st, nil
}

// Evaluate returns the mean validation cross-entropy (nats/token) over the
// first EvalBatches·GB validation windows, split over the replicas.
func (e *Engine) Evaluate(r Reducer) (float64, error) {
	n := e.Val.NumWindows()
	if e.EvalBatches > 0 {
		n = min(n, e.EvalBatches*e.GB)
	}
	start, count, err := data.BatchRange(0, n, r.Rank(), r.Size())
	if err != nil {
		return 0, fmt.Errorf("%w: eval: %w", ErrStep, err)
	}
	if e.M.B == 0 {
		if err := e.M.Prepare(1, e.M.Cfg.SeqLen); err != nil {
			return 0, fmt.Errorf("%w: eval: %w", ErrStep, err)
		}
	}
	sum, cnt, err := evalSum(e.M, e.Val, start, count, r.Err)
	if err := r.Err(); err != nil {
		return 0, err // the ring broke meanwhile: the pass is redone in the next
	}
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrStep, err)
	}
	sums, err := r.Sum([]float64{sum, float64(cnt)})
	if err != nil {
		return 0, err
	}
	if sums[1] == 0 {
		return 0, fmt.Errorf("%w: eval: no labelled tokens", ErrStep)
	}
	return sums[0] / sums[1], nil
}

// Snapshot copies the replica's state into a checkpoint of data step
// e.Step of job j: float32 parameters and moments, the counters, and the
// job itself, with val the validation loss at this step (0 if none).
func (e *Engine) Snapshot(j job.Job, val float64) (checkpoint.Checkpoint, error) {
	y, err := j.YAML()
	if err != nil {
		return checkpoint.Checkpoint{}, err
	}
	mom, vel := e.Opt.MomentsF32()
	return checkpoint.Checkpoint{Config: e.M.Cfg, Params: e.M.ParamsF32(), M: mom, V: vel,
		State: checkpoint.State{DataStep: e.Step, OptimizerStep: e.Opt.Step, Skipped: e.Skipped, Seed: j.Seed,
			BatchSize: e.GB, SeqLen: e.M.Cfg.SeqLen, ValLoss: val, Job: y}}, nil
}
