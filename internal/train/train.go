package train

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/schollz/progressbar/v3"

	"github.com/bmojo/bmojo/internal/data"
	"github.com/bmojo/bmojo/internal/device"
	"github.com/bmojo/bmojo/kernels/cuda"
	"github.com/bmojo/bmojo/model"
)

// Options are how a run reports, not what it computes.
type Options struct {
	Logger   hclog.Logger // nil = silent
	Progress io.Writer    // progress bar; nil = none
	Resume   bool         // continue from the newest good checkpoint in CheckpointDir
	Device   string       // compute device (internal/device): auto, cpu, cuda or cuda:N
}

// Result summarises a finished run.
type Result struct {
	Steps          int       // completed optimizer steps
	Skipped        int       // steps skipped for a non-finite gradient
	Losses         []float64 // training loss per step, from step 0 (resumed runs include the loaded history)
	ValLoss        float64   // final validation cross-entropy (nats/token)
	UnigramEntropy float64   // unigram entropy of the training split (nats/token)
	TokensPerSec   float64   // training throughput of this process
	Params         int       // parameter count
	Checkpoint     string    // last checkpoint written
	ResumedFrom    string    // checkpoint loaded at start, if any
}

// Run trains j to completion (or until ctx is done, after writing a
// checkpoint of the last completed step).
func Run(ctx context.Context, j Job, o Options) (Result, error) {
	log := o.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	if err := j.Validate(); err != nil {
		return Result{}, err
	}
	if j.Threads > 0 {
		defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(j.Threads))
	}
	mc, _ := j.ModelConfig()
	trainDS, err := data.Load(j.Data, data.SplitTrain)
	if err != nil {
		return Result{}, fmt.Errorf("train: data: %w", err)
	}
	valDS, err := data.Load(j.Data, data.SplitVal)
	if err != nil {
		return Result{}, fmt.Errorf("train: data: %w", err)
	}
	if trainDS.Vocab > mc.VocabSize {
		return Result{}, fmt.Errorf("train: dataset vocabulary %d exceeds the model's vocab_size %d", trainDS.Vocab, mc.VocabSize)
	}
	T, B := mc.SeqLen, j.BatchSize
	sampler, err := data.NewSampler(trainDS, T, j.Seed)
	if err != nil {
		return Result{}, fmt.Errorf("train: %w", err)
	}
	if err := os.MkdirAll(j.CheckpointDir, 0o755); err != nil {
		return Result{}, fmt.Errorf("train: checkpoint dir: %w", err)
	}
	if err := CheckWritable(j.CheckpointDir); err != nil {
		return Result{}, err
	}

	dev, err := device.Open(o.Device, cuda.Options{}, log.Named("device"))
	if err != nil {
		return Result{}, fmt.Errorf("train: %w", err)
	}
	defer dev.Close()
	m, err := model.New[float32](dev.Backend, mc, j.Seed)
	if err != nil {
		return Result{}, err
	}
	if err := m.Prepare(B, T); err != nil {
		return Result{}, err
	}
	opt := model.NewOptimizer(m, j.Optim())
	res := Result{Params: m.Layout.ParamCount(), UnigramEntropy: trainDS.UnigramEntropy()}
	log.Info("model", "preset", j.Preset, "params", res.Params, "layers", mc.NLayer, "d_model", mc.DModel,
		"mixers", mixerSummary(mc.Mixers), "seq_len", T, "batch", B, "device", dev.Desc)

	existing, err := ListCheckpoints(j.CheckpointDir)
	if err != nil {
		return Result{}, err
	}
	start := 0
	if o.Resume {
		ck, err := LatestCheckpoint(j.CheckpointDir, func(dir string, err error) {
			log.Warn("skipping unreadable checkpoint", "dir", dir, "error", err)
		})
		switch {
		case errors.Is(err, ErrNoCheckpoint):
			log.Info("no checkpoint to resume from; starting fresh", "dir", j.CheckpointDir)
		case err != nil:
			return Result{}, err
		default:
			if err := compatible(ck, mc, j); err != nil {
				return Result{}, err
			}
			if err := m.SetParams(ck.Params); err != nil {
				return Result{}, err
			}
			if err := opt.SetMoments(ck.M, ck.V, ck.State.Step-ck.State.Skipped); err != nil {
				return Result{}, err
			}
			start = ck.State.Step
			res.Losses = append(res.Losses, ck.State.Losses...)
			res.Skipped = ck.State.Skipped
			res.ResumedFrom = ck.Dir
			log.Info("resumed", "checkpoint", ck.Dir, "step", start)
		}
	} else if len(existing) > 0 {
		return Result{}, fmt.Errorf("train: %s already holds checkpoint %s; pass --resume to continue it or choose another checkpoint dir",
			j.CheckpointDir, existing[0])
	}

	var bar *progressbar.ProgressBar
	if o.Progress != nil {
		bar = progressbar.NewOptions(j.Steps,
			progressbar.OptionSetWriter(o.Progress),
			progressbar.OptionSetDescription("train"),
			progressbar.OptionShowCount(),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionSetElapsedTime(true),
			progressbar.OptionSetWidth(24),
			progressbar.OptionThrottle(250*time.Millisecond),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(o.Progress) }),
		)
		_ = bar.Set(start)
	}

	tokens, targets := make([]int32, B*T), make([]int32, B*T)
	save := func(step int, valLoss float64) error {
		mom, vel := opt.Moments()
		ck := Checkpoint{Config: mc, Params: m.ParamsHost(), M: mom, V: vel,
			State: State{Step: step, Seed: j.Seed, BatchSize: B, SeqLen: T, Skipped: res.Skipped, Losses: res.Losses, ValLoss: valLoss}}
		t0 := time.Now()
		dir, err := SaveCheckpoint(j.CheckpointDir, ck)
		if err != nil {
			return err
		}
		res.Checkpoint = dir
		log.Debug("checkpoint written", "dir", dir, "duration", time.Since(t0))
		return pruneCheckpoints(j.CheckpointDir, j.KeepCheckpoints)
	}
	t0 := time.Now()
	var trained int
	step := start
	for ; step < j.Steps; step++ {
		if err := ctx.Err(); err != nil {
			if step > start {
				if err := save(step, 0); err != nil {
					return res, err
				}
			}
			return res, fmt.Errorf("train: stopped at step %d: %w", step, err)
		}
		if err := sampler.Fill(0, step*B, B, tokens, targets); err != nil {
			return res, fmt.Errorf("train: step %d: %w", step, err)
		}
		m.ZeroGrads()
		l, err := m.Forward(tokens, targets)
		if err != nil {
			return res, fmt.Errorf("train: step %d: %w", step, err)
		}
		if err := m.Backward(); err != nil {
			return res, fmt.Errorf("train: step %d: %w", step, err)
		}
		r := opt.Apply()
		if r.Skipped || math.IsNaN(l.Total) || math.IsInf(l.Total, 0) {
			res.Skipped++
			log.Warn("non-finite loss or gradient; step skipped", "step", step, "loss", l.Total, "grad_norm", r.GradNorm)
		}
		// The reported loss is the language-model cross-entropy, comparable
		// with the validation loss; λ·aux only trains the innovation
		// predictor and is logged beside it.
		res.Losses = append(res.Losses, l.CE)
		trained++
		tps := float64(trained*B*T) / time.Since(t0).Seconds()
		if bar != nil {
			bar.Describe(fmt.Sprintf("loss %.3f  %.0f tok/s", l.CE, tps))
			_ = bar.Add(1)
		}
		last := step+1 == j.Steps
		var val float64
		if (j.EvalEvery > 0 && (step+1)%j.EvalEvery == 0) || last {
			if val, err = Evaluate(m, valDS, j.EvalBatches); err != nil {
				return res, err
			}
			res.ValLoss = val
			log.Info("eval", "step", step+1, "train_loss", round(l.CE), "innovation_aux", round(l.Aux), "val_loss", round(val),
				"tokens_per_s", math.Round(tps), "lr", r.LR, "grad_norm", round(r.GradNorm))
		}
		if (j.CheckpointEvery > 0 && (step+1)%j.CheckpointEvery == 0) || last {
			if err := save(step+1, val); err != nil {
				return res, err
			}
		}
	}
	res.Steps = step
	if trained > 0 {
		res.TokensPerSec = float64(trained*B*T) / time.Since(t0).Seconds()
	}
	return res, nil
}

// Evaluate returns the mean cross-entropy (nats/token) of m over the first
// batches batches of ds's unshuffled validation windows (0 = all of them)
// at the model's prepared batch shape.
func Evaluate(m *model.Model[float32], ds *data.Dataset, batches int) (float64, error) {
	s, err := data.EvalWindows(ds, m.T)
	if err != nil {
		return 0, fmt.Errorf("eval: %w", err)
	}
	n := s.NumWindows()
	if batches > 0 {
		n = min(n, batches*m.B)
	}
	sum, count, err := EvalSum(m, s, 0, n)
	if err != nil {
		return 0, err
	}
	if count == 0 {
		return 0, fmt.Errorf("eval: no labelled tokens")
	}
	return sum / float64(count), nil
}

// EvalSum returns the summed cross-entropy and the labelled-token count of
// windows [start, start+n) of s, so data-parallel ranks can evaluate
// disjoint shares and add them up.
func EvalSum(m *model.Model[float32], s *data.Sampler, start, n int) (sum float64, count int, err error) {
	B, T := m.B, m.T
	tokens, targets := make([]int32, B*T), make([]int32, B*T)
	for i := 0; i < n; i += B {
		k := min(B, n-i)
		if err := s.Fill(0, start+i, k, tokens[:k*T], targets[:k*T]); err != nil {
			return 0, 0, fmt.Errorf("eval: %w", err)
		}
		for r := k * T; r < B*T; r++ {
			tokens[r], targets[r] = 0, -1 // padding rows carry no label
		}
		l, err := m.Forward(tokens, targets)
		if err != nil {
			return 0, 0, fmt.Errorf("eval: %w", err)
		}
		sum += l.CE * float64(l.Labelled)
		count += l.Labelled
	}
	return sum, count, nil
}

func compatible(ck *Checkpoint, mc model.Config, j Job) error {
	a, b := model.ConfigMetadata(ck.Config)[model.ConfigKey], model.ConfigMetadata(mc)[model.ConfigKey]
	if a != b {
		return fmt.Errorf("train: checkpoint %s was trained with a different model config:\n  checkpoint: %s\n  job:        %s", ck.Dir, a, b)
	}
	if ck.State.BatchSize != j.BatchSize {
		return fmt.Errorf("train: checkpoint %s used batch_size %d, the job says %d; the data order depends on it",
			ck.Dir, ck.State.BatchSize, j.BatchSize)
	}
	if ck.State.Seed != j.Seed {
		return fmt.Errorf("train: checkpoint %s used seed %d, the job says %d", ck.Dir, ck.State.Seed, j.Seed)
	}
	return nil
}

// CheckWritable fails with a clear error when dir cannot take new files.
func CheckWritable(dir string) error {
	f, err := os.CreateTemp(dir, ".write-test-*")
	if err != nil {
		return fmt.Errorf("train: checkpoint dir %s is not writable: %w", dir, err)
	}
	name := f.Name()
	f.Close()
	return os.Remove(name)
}

func mixerSummary(ms []string) string {
	counts := map[string]int{}
	var order []string
	for _, m := range ms {
		if counts[m] == 0 {
			order = append(order, m)
		}
		counts[m]++
	}
	s := ""
	for i, m := range order {
		if i > 0 {
			s += "+"
		}
		s += fmt.Sprintf("%d×%s", counts[m], m)
	}
	return s
}

func round(x float64) float64 { return math.Round(x*1e4) / 1e4 }
