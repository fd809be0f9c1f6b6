package train

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/schollz/progressbar/v3"

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/data"
	"github.com/bmojo/bmojo/internal/device"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/model"
	"github.com/bmojo/bmojo/tokenizer"
)

// ErrFinished means the checkpoint directory holds this job, already done.
var ErrFinished = errors.New("job already finished")

// Options are how a run reports, not what it computes.
type Options struct {
	Logger   hclog.Logger // nil = silent
	Progress io.Writer    // progress bar; nil = none
	Device   string       // compute device (internal/device): auto, cpu, cuda or cuda:N
}

// Result summarises a finished run.
type Result struct {
	Steps          int       // completed training steps (checkpoint.State.DataStep: skipped steps count)
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
// checkpoint of the last completed step). When j.CheckpointDir holds
// checkpoints of this job, Run resumes from the newest that verifies; a
// checkpoint of a job with other settings (job.Job.Diff) is refused, naming
// them. The loop is cadence only: the step is Engine's, as a worker's is.
func Run(ctx context.Context, j job.Job, o Options) (Result, error) {
	log := o.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	err := j.Validate()
	if err != nil {
		return Result{}, err
	}
	if j.Threads > 0 {
		defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(j.Threads))
	}
	if j, err = ResolveTokenizer(j); err != nil {
		return Result{}, err
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

	dev, err := device.Open(o.Device, device.Options{Logger: log.Named("device")})
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
	valS, err := data.EvalWindows(valDS, T)
	if err != nil {
		return Result{}, fmt.Errorf("train: %w", err)
	}
	e := &Engine{M: m, Opt: opt, Train: sampler, Val: valS, GB: B, EvalBatches: j.EvalBatches}
	res := Result{Params: m.Layout.ParamCount(), UnigramEntropy: trainDS.UnigramEntropy()}
	log.Info("model", "preset", j.Preset, "params", res.Params, "layers", mc.NLayer, "d_model", mc.DModel,
		"mixers", mixerSummary(mc.Mixers), "seq_len", T, "batch", B, "device", dev.Desc)

	// A damaged checkpoint is set aside, as a worker does, so its step can
	// be checkpointed again.
	ck, err := checkpoint.LoadLatest(j.CheckpointDir, func(dir string, err error) {
		aside, aerr := checkpoint.SetAside(dir)
		log.Warn("skipping damaged checkpoint", "dir", dir, "error", err, "moved_to", aside)
		if aerr != nil {
			log.Warn("could not set the damaged checkpoint aside", "dir", dir, "error", aerr)
		}
	})
	switch {
	case errors.Is(err, checkpoint.ErrNoCheckpoint):
	case err != nil:
		return Result{}, err
	default:
		if err := compatible(ck, mc, j); err != nil {
			return Result{}, err
		}
		if err := m.SetParamsF32(ck.Params); err != nil {
			return Result{}, err
		}
		if err := opt.SetMomentsF32(ck.M, ck.V, ck.State.OptimizerStep); err != nil {
			return Result{}, err
		}
		e.Step, e.Skipped = ck.State.DataStep, ck.State.Skipped
		res.Losses = append(res.Losses, ck.State.Losses...)
		res.Skipped = ck.State.Skipped
		res.ResumedFrom = ck.Dir
		log.Info("resumed", "checkpoint", ck.Dir, "step", e.Step)
	}
	start := e.Step
	if start >= j.Steps {
		return res, fmt.Errorf("%w: %s reached step %d (val loss %.4f); choose another checkpoint_dir to train again",
			ErrFinished, j.CheckpointDir, start, ck.State.ValLoss)
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

	save := func(valLoss float64) error {
		ck, err := e.Snapshot(j, valLoss)
		if err != nil {
			return err
		}
		ck.State.Losses = res.Losses
		t0 := time.Now()
		man, err := checkpoint.Save(j.CheckpointDir, ck)
		if err != nil {
			return fmt.Errorf("train: %w", err)
		}
		res.Checkpoint = man.Dir
		log.Debug("checkpoint written", "dir", man.Dir, "duration", time.Since(t0))
		if _, err := checkpoint.Prune(j.CheckpointDir, j.KeepCheckpoints); err != nil {
			return fmt.Errorf("train: %w", err)
		}
		return nil
	}
	t0 := time.Now()
	var trained int
	for e.Step < j.Steps {
		if err := ctx.Err(); err != nil {
			if e.Step > start {
				if err := save(0); err != nil {
					return res, err
				}
			}
			return res, fmt.Errorf("train: stopped at step %d: %w", e.Step, err)
		}
		st, err := e.TrainStep(Local{})
		if err != nil {
			return res, fmt.Errorf("train: %w", err)
		}
		if st.Skipped {
			log.Warn("non-finite loss or gradient; step skipped", "step", e.Step-1, "loss", st.Loss, "grad_norm", st.GradNorm)
		}
		// The reported loss is the language-model cross-entropy, comparable
		// with the validation loss; λ·aux only trains the innovation
		// predictor and is logged beside it.
		res.Losses = append(res.Losses, st.Loss)
		res.Skipped = e.Skipped
		trained++
		tps := float64(trained*B*T) / time.Since(t0).Seconds()
		if bar != nil {
			bar.Describe(fmt.Sprintf("loss %.3f  %.0f tok/s", st.Loss, tps))
			_ = bar.Add(1)
		}
		last := e.Step == j.Steps
		var val float64
		if (j.EvalEvery > 0 && e.Step%j.EvalEvery == 0) || last {
			if val, err = e.Evaluate(Local{}); err != nil {
				return res, fmt.Errorf("train: %w", err)
			}
			res.ValLoss = val
			log.Info("eval", "step", e.Step, "train_loss", round(st.Loss), "innovation_aux", round(st.Aux), "val_loss", round(val),
				"tokens_per_s", math.Round(tps), "lr", st.LR, "grad_norm", round(st.GradNorm))
		}
		if (j.CheckpointEvery > 0 && e.Step%j.CheckpointEvery == 0) || last {
			if err := save(val); err != nil {
				return res, err
			}
		}
	}
	step := e.Step
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
	return evalSum(m, s, start, n, nil)
}

// evalSum is EvalSum, stopping early (with the error) when stop, checked
// between batches, returns one.
func evalSum(m *model.Model[float32], s *data.Sampler, start, n int, stop func() error) (sum float64, count int, err error) {
	B, T := m.B, m.T
	tokens, targets := make([]int32, B*T), make([]int32, B*T)
	for i := 0; i < n; i += B {
		if stop != nil {
			if err := stop(); err != nil {
				return 0, 0, err
			}
		}
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

// compatible refuses to resume j from ck when ck was written by a job with
// other settings: the job it records (job.Job.Diff), or, for checkpoints that
// record none, its model, batch size and seed.
func compatible(ck *checkpoint.Checkpoint, mc model.Config, j job.Job) error {
	if ck.State.Job != "" {
		old, err := job.Parse(filepath.Join(ck.Dir, checkpoint.StateFile), []byte(ck.State.Job))
		if err != nil {
			return fmt.Errorf("train: checkpoint %s: %w", ck.Dir, err)
		}
		if a, b := tokenizer.CanonicalName(old.Tokenizer), tokenizer.CanonicalName(j.Tokenizer); a != b {
			return fmt.Errorf("train: %w: checkpoint %s was trained with tokenizer %s, the dataset %s is tokenized with %s; train it in another checkpoint_dir",
				ErrTokenizer, ck.Dir, a, dataName(j.Data), b)
		}
		return j.ResumeError(old, ck.Dir)
	}
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

// ErrTokenizer: data and a model (or a job) of different tokenizers.
var ErrTokenizer = errors.New("tokenizer mismatch")

// ResolveTokenizer settles j's tokenizer against its dataset: a job naming
// none takes the dataset's; one naming another is refused, naming both. The
// model's vocab_size grows to the tokenizer's padded vocabulary
// (tokenizer.PadVocab: 50,304 for gpt2) when it is smaller. The result
// records bytes as "" (job.Job.Tokenizer). Train and the local launcher
// call it before a run, so checkpoints record what was resolved.
func ResolveTokenizer(j job.Job) (job.Job, error) {
	dsName, vocab := tokenizer.Bytes, tokenizer.ByteVocab
	if j.Data != "" && !strings.EqualFold(j.Data, "bundled") {
		m, err := data.ReadManifest(j.Data)
		if err != nil {
			return j, fmt.Errorf("train: data: %w", err)
		}
		dsName, vocab = m.Tokenizer, m.Vocab
	}
	want := dsName
	if j.Tokenizer != "" {
		want = tokenizer.CanonicalName(j.Tokenizer)
		if want != tokenizer.Bytes && want != tokenizer.GPT2 {
			// A tokenizer.json path: compare its content's name.
			if _, err := os.Stat(j.Tokenizer); err == nil {
				tok, err := tokenizer.LoadFile(j.Tokenizer)
				if err != nil {
					return j, fmt.Errorf("train: tokenizer: %w", err)
				}
				want = tok.Name()
			}
		}
	}
	if want != dsName {
		return j, fmt.Errorf("train: %w: the job's tokenizer is %s, the dataset %s is tokenized with %s; prepare the data with --tokenizer %s or train with --tokenizer %s",
			ErrTokenizer, want, dataName(j.Data), dsName, want, dsName)
	}
	j.Tokenizer = want
	if want == tokenizer.Bytes {
		j.Tokenizer = ""
	}
	mc, err := j.ModelConfig()
	if err != nil {
		return j, err
	}
	if mc.VocabSize < vocab {
		mc.VocabSize = tokenizer.PadVocab(vocab)
		j.Model = mc
	}
	return j, nil
}

func dataName(dir string) string {
	if dir == "" {
		return "bundled"
	}
	return dir
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
