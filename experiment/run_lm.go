package experiment

import (
	"context"
	"fmt"
	"math"
	"time"

	"github.com/bmojo/bmojo/data"
	"github.com/bmojo/bmojo/model"
	"github.com/bmojo/bmojo/tokenizer"
)

// DataID names a dataset's content for cell hashes, and returns its
// vocabulary padded as models pad it: the bundled corpus, or a prepared
// directory's tokenizer and split token counts (a dataset re-prepared from
// other text gets another ID unless its counts agree, which cell hashes
// accept as the same data).
func DataID(dir string) (string, int, error) {
	if dir == "" || dir == "bundled" {
		tr, err := data.Load("", data.SplitTrain)
		if err != nil {
			return "", 0, err
		}
		return fmt.Sprintf("bundled:%d", tr.NumTokens()), tokenizer.PadVocab(tr.Vocab), nil
	}
	m, err := data.ReadManifest(dir)
	if err != nil {
		return "", 0, fmt.Errorf("experiment: --data: %w", err)
	}
	id := fmt.Sprintf("%s:train=%d:val=%d", m.Tokenizer, m.Tokens(data.SplitTrain), m.Tokens(data.SplitVal))
	return id, tokenizer.PadVocab(m.Vocab), nil
}

// RunLM trains a language model cell on its dataset's train split at
// TrainT and evaluates it on the validation split at every EvalT: the mean
// loss and the position-wise loss in buckets of Bucket positions.
//
// State passing (mamba only): each training row is an unrelated window of
// TrainT tokens followed by the training window, with the loss on the
// second half only. A mamba model has no positions, so the training
// window's forward pass starts exactly from the final SSM and convolution
// state of the unrelated window. Unlike state passing with a detached
// state, gradients also flow through the prefix; and the cost is twice a
// plain step's.
func RunLM(ctx context.Context, env Env, c Cell) (Result, error) {
	if err := c.Validate(); err != nil {
		return Result{}, err
	}
	trainDS, err := data.Load(c.Data, data.SplitTrain)
	if err != nil {
		return Result{}, fmt.Errorf("experiment: %w", err)
	}
	valDS, err := data.Load(c.Data, data.SplitVal)
	if err != nil {
		return Result{}, fmt.Errorf("experiment: %w", err)
	}
	cfg, err := c.ModelConfig(tokenizer.PadVocab(trainDS.Vocab))
	if err != nil {
		return Result{}, err
	}
	t0 := time.Now()
	m, err := model.New[float32](env.Backend, cfg, c.Seed)
	if err != nil {
		return Result{}, fmt.Errorf("experiment: %s: %w", c.Name(), err)
	}
	T, B := c.TrainT, c.Batch
	rowT := T
	if c.StatePassing {
		rowT = 2 * T
	}
	if err := m.Prepare(B, rowT); err != nil {
		return Result{}, fmt.Errorf("experiment: %s: %w", c.Name(), err)
	}
	smp, err := data.NewSampler(trainDS, T, c.Seed)
	if err != nil {
		return Result{}, fmt.Errorf("experiment: %s: %w", c.Name(), err)
	}
	// The unrelated prefixes come from the same stream at another epoch:
	// a window is never its own prefix within a step.
	opt := model.NewOptimizer(m, optimConfig(c, c.Steps))
	tokens, targets := make([]int32, B*rowT), make([]int32, B*rowT)
	tok1, tgt1 := make([]int32, B*T), make([]int32, B*T)
	res := Result{Hash: c.Hash(), Cell: c, Device: env.Device, Params: m.Layout.ParamCount()}
	tl := newTrainLog(env, c, res.Hash, c.Steps)
	for step := range c.Steps {
		if err := ctx.Err(); err != nil {
			return Result{}, fmt.Errorf("experiment: %s: stopped at step %d: %w", c.Name(), step, err)
		}
		if err := smp.Fill(0, step*B, B, tok1, tgt1); err != nil {
			return Result{}, fmt.Errorf("experiment: %s: %w", c.Name(), err)
		}
		if c.StatePassing {
			pre, preT := make([]int32, B*T), make([]int32, B*T)
			if err := smp.Fill(1<<20, step*B+smp.NumWindows()/2, B, pre, preT); err != nil {
				return Result{}, fmt.Errorf("experiment: %s: %w", c.Name(), err)
			}
			for r := range B {
				copy(tokens[r*rowT:], pre[r*T:(r+1)*T])
				for p := range T {
					targets[r*rowT+p] = -1
				}
				copy(tokens[r*rowT+T:], tok1[r*T:(r+1)*T])
				copy(targets[r*rowT+T:], tgt1[r*T:(r+1)*T])
			}
		} else {
			copy(tokens, tok1)
			copy(targets, tgt1)
		}
		l, skipped, err := trainStep(m, opt, tokens, targets)
		if err != nil {
			return Result{}, fmt.Errorf("experiment: %s: step %d: %w", c.Name(), step, err)
		}
		if skipped {
			res.Skipped++
		}
		res.TrainTokens += int64(B * rowT)
		tl.add(step, l.CE)
	}
	if err := env.Backend.Err(); err != nil {
		return Result{}, fmt.Errorf("experiment: %s: %w", c.Name(), err)
	}
	res.Steps, res.TrainLoss = c.Steps, tenths(tl.losses)
	ck, err := saveCheckpoint(env.Cache, c, m, opt, c.Steps, rowT, tl.losses)
	if err != nil {
		return Result{}, err
	}
	res.Checkpoint = ck
	env.report(Progress{Cell: c.Name(), Hash: res.Hash, Phase: "eval", Step: c.Steps, Steps: c.Steps})
	for _, et := range c.EvalT {
		lr, err := EvalLength(ctx, m, valDS, et, c.WindowsAt(et), c.Bucket)
		if err != nil {
			return Result{}, fmt.Errorf("experiment: %s: %w", c.Name(), err)
		}
		res.LM = append(res.LM, lr)
	}
	res.WallSeconds = time.Since(t0).Seconds()
	return res, nil
}

// EvalLength evaluates m on the first windows (0 = all) unshuffled
// validation windows of length T, one window per forward pass: the mean
// loss over every predicted token and the mean loss per bucket of
// positions. A split with no window of length T is reported, not an error.
func EvalLength(ctx context.Context, m *model.Model[float32], ds *data.Dataset, T, windows, bucket int) (LengthResult, error) {
	out := LengthResult{T: T}
	s, err := data.EvalWindows(ds, T)
	if err != nil {
		out.Note = fmt.Sprintf("no window of %d tokens in %s", T, ds.Name)
		out.MeanLoss = Float(math.NaN())
		return out, nil
	}
	n := s.NumWindows()
	if windows > 0 {
		n = min(n, windows)
	}
	if err := m.Prepare(1, T); err != nil {
		return out, err
	}
	defer func(h bool) { m.LabelledHead = h }(m.LabelledHead)
	m.LabelledHead = false // every position's loss
	V := m.Cfg.VocabSize
	nb := (T + bucket - 1) / bucket
	bsum, bcnt := make([]float64, nb), make([]int, nb)
	tokens, targets := make([]int32, T), make([]int32, T)
	var total float64
	var count int
	for w := range n {
		if err := ctx.Err(); err != nil {
			return out, err
		}
		if err := s.Fill(0, w, 1, tokens, targets); err != nil {
			return out, err
		}
		// The loss at each position comes from the device: downloading the
		// [T, V] logits and taking the softmax on the host cost minutes per
		// cell at V = 50,257 and T = 8K.
		if _, err := m.Forward(tokens, targets); err != nil {
			return out, fmt.Errorf("eval at %d: %w", T, err)
		}
		losses := m.RowLosses()
		if len(losses) != T {
			return out, fmt.Errorf("eval at %d: got %d position losses", T, len(losses))
		}
		for p := range T {
			y := targets[p]
			if y < 0 || int(y) >= V {
				continue
			}
			l := float64(losses[p])
			total += l
			count++
			bsum[p/bucket] += l
			bcnt[p/bucket]++
		}
	}
	out.Windows = n
	if count > 0 {
		out.MeanLoss = Float(total / float64(count))
	}
	for b := range nb {
		if bcnt[b] > 0 {
			out.Buckets = append(out.Buckets, Bucket{Start: b * bucket, End: min(T, (b+1)*bucket), Loss: Float(bsum[b] / float64(bcnt[b]))})
		}
	}
	return out, nil
}
