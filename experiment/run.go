package experiment

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"time"

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/experiment/mqar"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/model"
)

// Progress is one report from a running cell.
type Progress struct {
	Cell  string  // Cell.Name
	Hash  string  // Cell.Hash
	Phase string  // "train" or "eval"
	Step  int     // steps done
	Steps int     // steps planned
	Loss  float64 // mean training loss since the last report
}

// Env is where a cell runs: its backend, the device's name for the
// result, the cache, and an optional progress callback (called from the
// cell's goroutine at most every ReportEvery).
type Env struct {
	Backend     kernels.Backend[float32]
	Device      string
	Cache       Cache
	Report      func(Progress)
	ReportEvery time.Duration
}

func (e Env) report(p Progress) {
	if e.Report != nil {
		e.Report(p)
	}
}

// batchRef is one training batch of an MQAR cell: Rows examples of one
// setting, by index into that setting's training set.
type batchRef struct {
	setting int
	first   []int
}

// mqarSchedule is the cell's batches, in order: each epoch visits every
// example of every mix entry once; examples are shuffled within a setting,
// cut into batches of one setting, and the batches shuffled, all from the
// cell's seed.
func mqarSchedule(c Cell) []batchRef {
	var out []batchRef
	for e := range c.Epochs {
		r := rand.New(rand.NewPCG(c.Seed, uint64(e)+1))
		var ep []batchRef
		for si, m := range c.Mix {
			idx := r.Perm(m.Examples)
			for a := 0; a < len(idx); a += c.Batch {
				ep = append(ep, batchRef{si, idx[a:min(a+c.Batch, len(idx))]})
			}
		}
		r.Shuffle(len(ep), func(i, j int) { ep[i], ep[j] = ep[j], ep[i] })
		out = append(out, ep...)
	}
	return out
}

// MQARSteps is the number of optimizer steps of an MQAR cell.
func MQARSteps(c Cell) int {
	n := 0
	for _, m := range c.Mix {
		n += (m.Examples + c.Batch - 1) / c.Batch
	}
	return n * c.Epochs
}

// optimConfig is the protocol's AdamW: weight decay 0.1 on matrices,
// warm-up over the first 5% of steps, cosine decay to 0 (MQAR) or to 10%
// (LM, the project's default).
func optimConfig(c Cell, steps int) model.OptimConfig {
	o := model.DefaultOptim(c.LR, steps)
	if c.Kind == KindMQAR {
		o.MinLRFrac = 0
	}
	return o
}

// RunMQAR trains and tests an MQAR cell and returns its result (the
// caller stores it). It writes the trained model as a normal checkpoint
// under the cache's CheckpointDir.
func RunMQAR(ctx context.Context, env Env, c Cell) (Result, error) {
	if err := c.Validate(); err != nil {
		return Result{}, err
	}
	cfg, err := c.ModelConfig(mqar.Vocab)
	if err != nil {
		return Result{}, err
	}
	t0 := time.Now()
	m, err := model.New[float32](env.Backend, cfg, c.Seed)
	if err != nil {
		return Result{}, fmt.Errorf("experiment: %s: %w", c.Name(), err)
	}
	// Each batch runs at its setting's own length (the model keeps the
	// activations of each length), with B rows: a short last batch of a
	// setting is padded with unlabelled filler rows. The head runs only
	// at the query positions (model.LabelledHead), K of T.
	T, B := c.MaxTrainT(), c.Batch
	m.LabelledHead = true
	lengths := map[int]bool{}
	for _, e := range c.Mix {
		lengths[e.Setting.T] = true
	}
	m.KeepShapes = len(lengths)
	sched := mqarSchedule(c)
	opt := model.NewOptimizer(m, optimConfig(c, len(sched)))
	res := Result{Hash: c.Hash(), Cell: c, Device: env.Device, Params: m.Layout.ParamCount()}
	tl := newTrainLog(env, c, res.Hash, len(sched))
	// The batches are generated one or two ahead, beside the device's
	// work (a batch of (256, 64) takes milliseconds of CPU).
	fctx, stopFill := context.WithCancel(ctx)
	defer stopFill()
	batches := mqarBatches(fctx, c, sched, mqar.Source{Seed: c.Seed, Noise: c.Noise}, B, T)
	for step := range sched {
		var b mqarBatch
		select {
		case b = <-batches.ready:
		case <-ctx.Done():
		}
		if err := ctx.Err(); err != nil {
			return Result{}, fmt.Errorf("experiment: %s: stopped at step %d: %w", c.Name(), step, err)
		}
		if b.err != nil {
			return Result{}, fmt.Errorf("experiment: %s: step %d: %w", c.Name(), step, b.err)
		}
		if err := m.Prepare(B, b.T); err != nil {
			return Result{}, fmt.Errorf("experiment: %s: %w", c.Name(), err)
		}
		l, skipped, err := trainStep(m, opt, b.tokens, b.targets)
		if err != nil {
			return Result{}, fmt.Errorf("experiment: %s: step %d: %w", c.Name(), step, err)
		}
		batches.free <- b
		if skipped {
			res.Skipped++
		}
		res.TrainTokens += int64(len(b.tokens))
		tl.add(step, l.CE)
	}
	if err := env.Backend.Err(); err != nil {
		return Result{}, fmt.Errorf("experiment: %s: %w", c.Name(), err)
	}
	res.Steps, res.TrainLoss = len(sched), tenths(tl.losses)
	ck, err := saveCheckpoint(env.Cache, c, m, opt, res.Steps, T, tl.losses)
	if err != nil {
		return Result{}, err
	}
	res.Checkpoint = ck
	m.KeepShapes = 0 // each test length once: free the training shapes
	env.report(Progress{Cell: c.Name(), Hash: res.Hash, Phase: "eval", Step: res.Steps, Steps: res.Steps})
	for _, s := range c.Test {
		sc, err := EvalMQAR(ctx, m, mqar.Source{Seed: c.TestSeed, Noise: c.Noise}, s, c.TestExamples)
		if err != nil {
			return Result{}, fmt.Errorf("experiment: %s: %w", c.Name(), err)
		}
		res.MQAR = append(res.MQAR, SettingResult{Setting: s, Accuracy: sc.Accuracy(), Loss: Float(sc.Loss()), Examples: sc.Examples})
	}
	res.WallSeconds = time.Since(t0).Seconds()
	return res, nil
}

// mqarBatch is one generated training batch: B rows at length T.
type mqarBatch struct {
	T               int
	tokens, targets []int32
	err             error
	buf, tbuf       []int32 // the whole buffers, B × the longest length
}

// mqarFeed is the generator's two channels: batches in schedule order,
// and the buffers the trainer is done with.
type mqarFeed struct {
	ready, free chan mqarBatch
}

// mqarBatches generates the schedule's batches in order on its own
// goroutine, at most three ahead of the trainer (which hands each batch's
// buffers back on free), until the schedule ends or ctx is done. A short
// last batch of a setting is padded with unlabelled filler rows.
func mqarBatches(ctx context.Context, c Cell, sched []batchRef, src mqar.Source, B, T int) mqarFeed {
	const ahead = 3
	f := mqarFeed{ready: make(chan mqarBatch, ahead), free: make(chan mqarBatch, ahead+1)}
	for range ahead + 1 {
		f.free <- mqarBatch{buf: make([]int32, B*T), tbuf: make([]int32, B*T)}
	}
	go func() {
		for _, r := range sched {
			var b mqarBatch
			select {
			case b = <-f.free:
			case <-ctx.Done():
				return
			}
			s := c.Mix[r.setting].Setting
			b.T, b.tokens, b.targets = s.T, b.buf[:B*s.T], b.tbuf[:B*s.T]
			for p := len(r.first) * s.T; p < len(b.tokens); p++ {
				b.tokens[p], b.targets[p] = mqar.Filler, mqar.Ignore
			}
			for row, i := range r.first {
				if b.err = src.Fill(s, i, 1, b.tokens[row*s.T:(row+1)*s.T], b.targets[row*s.T:(row+1)*s.T]); b.err != nil {
					break
				}
			}
			select {
			case f.ready <- b:
			case <-ctx.Done():
				return
			}
			if b.err != nil {
				return
			}
		}
	}()
	return f
}

// EvalBatch is the evaluation batch at length T: as many rows as keep the
// logits near 2^25 floats (128 MiB), at most 64. A fixed function of T, so
// that `bmojo eval --task mqar` runs the very batches a cell ran.
func EvalBatch(T, vocab int) int {
	return max(1, min(64, (1<<25)/(T*vocab)))
}

// EvalMQAR scores m on the first n examples of setting s from src.
func EvalMQAR(ctx context.Context, m *model.Model[float32], src mqar.Source, s mqar.Setting, n int) (mqar.Score, error) {
	if err := s.Validate(); err != nil {
		return mqar.Score{}, err
	}
	V := m.Cfg.VocabSize
	if V < mqar.Vocab {
		return mqar.Score{}, fmt.Errorf("%w: the model's vocabulary %d is smaller than MQAR's %d: not an MQAR model", ErrSpec, V, mqar.Vocab)
	}
	B := EvalBatch(s.T, V)
	if err := m.Prepare(B, s.T); err != nil {
		return mqar.Score{}, err
	}
	tokens, targets := make([]int32, B*s.T), make([]int32, B*s.T)
	var total mqar.Score
	for first := 0; first < n; first += B {
		if err := ctx.Err(); err != nil {
			return mqar.Score{}, err
		}
		k := min(B, n-first)
		if err := src.Fill(s, first, k, tokens[:k*s.T], targets[:k*s.T]); err != nil {
			return mqar.Score{}, err
		}
		for p := k * s.T; p < B*s.T; p++ {
			tokens[p], targets[p] = mqar.Filler, mqar.Ignore
		}
		// The loss comes from the model (computed on the device), the
		// accuracy from the argmax at the query positions, whose logits
		// alone the labelled head computes and reads back.
		m.LabelledHead = true
		l, err := m.Forward(tokens, targets)
		if err != nil {
			return mqar.Score{}, fmt.Errorf("eval %v: %w", s, err)
		}
		rows, pos := m.LabelledLogits()
		sc, err := mqar.ScoreLabelled(rows, pos, targets, k, s.T, V)
		if err != nil {
			return mqar.Score{}, err
		}
		sc.LossSum = l.CE * float64(l.Labelled)
		total.Add(sc)
	}
	return total, nil
}

// saveCheckpoint writes the cell's model as a normal bmojo checkpoint and
// returns its path relative to the directory above the cell's checkpoints
// (Cache.CellDir, or the cell's directory under Cache.Checkpoints).
func saveCheckpoint(k Cache, c Cell, m *model.Model[float32], opt *model.Optimizer[float32], steps, T int, losses []float64) (string, error) {
	mom, vel := opt.MomentsF32()
	root := k.CheckpointDir(c)
	man, err := checkpoint.Save(root, checkpoint.Checkpoint{Config: m.Cfg, Params: m.ParamsF32(), M: mom, V: vel,
		State: checkpoint.State{DataStep: steps, OptimizerStep: opt.Step, Seed: c.Seed, BatchSize: c.Batch, SeqLen: T, Losses: losses}})
	if err != nil {
		return "", fmt.Errorf("experiment: %s: %w", c.Name(), err)
	}
	rel, err := filepath.Rel(k.ckptCellDir(c), man.Dir)
	if err != nil {
		return man.Dir, nil
	}
	return rel, nil
}

// trainStep is one optimizer step of a cell's model on one batch: forward,
// backward, AdamW. skipped reports a step the optimizer refused (a
// non-finite gradient) or whose loss is not finite.
func trainStep(m *model.Model[float32], opt *model.Optimizer[float32], tokens, targets []int32) (l model.Loss, skipped bool, err error) {
	if l, err = m.Forward(tokens, targets); err != nil {
		return l, false, err
	}
	m.ZeroGrads()
	if err := m.Backward(); err != nil {
		return l, false, err
	}
	st := opt.Apply()
	return l, st.Skipped || math.IsNaN(l.Total) || math.IsInf(l.Total, 0), nil
}

// trainLog keeps a cell's training losses and reports their mean since the
// last report every Env.ReportEvery, and at the last step.
type trainLog struct {
	env        Env
	cell, hash string
	steps      int
	losses     []float64
	last       time.Time
	sum        float64
	cnt        int
}

func newTrainLog(env Env, c Cell, hash string, steps int) *trainLog {
	return &trainLog{env: env, cell: c.Name(), hash: hash, steps: steps, losses: make([]float64, 0, steps), last: time.Now()}
}

// add records step's loss (steps count from 0).
func (g *trainLog) add(step int, loss float64) {
	g.losses = append(g.losses, loss)
	g.sum, g.cnt = g.sum+loss, g.cnt+1
	if time.Since(g.last) >= g.env.ReportEvery || step == g.steps-1 {
		g.env.report(Progress{Cell: g.cell, Hash: g.hash, Phase: "train", Step: step + 1, Steps: g.steps, Loss: g.sum / float64(g.cnt)})
		g.last, g.sum, g.cnt = time.Now(), 0, 0
	}
}
