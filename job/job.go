// The job file: a whole training run as a versioned YAML document (Job),
// read by Load and Parse, checked by Validate, compared by Diff.
package job

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"runtime"

	"go.yaml.in/yaml/v3"

	"github.com/bmojo/bmojo/model"
)

// FileVersion is the job file format version this build reads.
const FileVersion = 1

// ErrInvalid is wrapped by every job validation error.
var ErrInvalid = errors.New("invalid job")

// Job is a whole training run. Zero values mean "default" only where the
// field says so; Default fills everything.
type Job struct {
	Version int    `yaml:"version"` // job file format, must be 1
	Name    string `yaml:"name"`    // run name, used in logs

	// Preset names the model (model.Preset, e.g. "bmojo", "mamba-tiny");
	// Model holds keys that override the preset (docs/model.md §1 names).
	Preset string       `yaml:"preset"`
	Model  model.Config `yaml:"model"`

	Steps       int     `yaml:"steps"`        // optimizer steps
	BatchSize   int     `yaml:"batch_size"`   // sequences per step (global batch)
	LR          float64 `yaml:"lr"`           // peak learning rate
	WarmupSteps int     `yaml:"warmup_steps"` // linear warm-up steps; 0 = 5% of steps
	WeightDecay float64 `yaml:"weight_decay"` // AdamW decay on matrices
	ClipNorm    float64 `yaml:"clip_norm"`    // global gradient-norm clip; 0 = off
	Seed        uint64  `yaml:"seed"`         // init and data order

	Data        string `yaml:"data"`         // prepared dataset dir; "" = bundled corpus
	EvalEvery   int    `yaml:"eval_every"`   // steps between validation passes; 0 = only at the end
	EvalBatches int    `yaml:"eval_batches"` // validation batches per pass; 0 = whole split

	// Tokenizer names the tokenizer of the data and the model: bytes,
	// gpt2 or a tokenizer.json path (see package tokenizer). "" takes the
	// dataset's; a run records what it resolved to ("" for bytes, so job
	// files and checkpoints from before tokenizers had names still match).
	Tokenizer string `yaml:"tokenizer,omitempty"`

	CheckpointDir   string `yaml:"checkpoint_dir"`   // where step-N/ directories go
	CheckpointEvery int    `yaml:"checkpoint_every"` // steps between checkpoints; 0 = only at the end
	KeepCheckpoints int    `yaml:"keep_checkpoints"` // newest checkpoints kept; 0 = all

	Threads int `yaml:"threads"` // CPU threads for the kernels; 0 = all cores

	// AllReduce picks how the workers' ring all-reduces gradients: auto
	// ("" means auto) is hierarchical when the ring's members span two or
	// more hosts with the same number (two or more) on each (reduce-scatter
	// inside each host, a ring across hosts per local rank, all-gather
	// inside each host; allreduce.Hier), else one flat ring; flat is always
	// one flat ring; hier is auto that warns when the ring's shape rules
	// the hierarchy out. Every worker reads it from the job, so all ranks
	// decide alike.
	AllReduce string `yaml:"allreduce,omitempty"`
}

// AllReduce values.
const (
	AllReduceAuto = "auto"
	AllReduceFlat = "flat"
	AllReduceHier = "hier"
)

// Default is the README's main job: the tiny B'MOJO preset (eidetic memory
// on) on the bundled corpus, sized to finish in about five minutes on a
// 2-core CPU and to get well under the corpus's unigram entropy.
func Default() Job {
	return Job{
		Version:         FileVersion,
		Name:            "bmojo-tiny",
		Preset:          "bmojo-tiny",
		Steps:           600,
		BatchSize:       8,
		LR:              3e-3,
		WeightDecay:     0.1,
		ClipNorm:        1,
		Seed:            1,
		EvalEvery:       100,
		EvalBatches:     8,
		CheckpointDir:   "runs/bmojo-tiny",
		CheckpointEvery: 100,
		KeepCheckpoints: 3,
	}
}

// ModelConfig resolves the preset and the overrides the job file gave.
// Overrides are applied by Load; here the preset fills a zero Model.
func (j Job) ModelConfig() (model.Config, error) {
	if j.Model.DModel != 0 {
		return j.Model, nil
	}
	return model.Preset(j.Preset)
}

// Validate checks the job without side effects; errors name the field.
func (j Job) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, a...))
	}
	if j.Version != FileVersion {
		return bad("version is %d; this build reads version %d job files", j.Version, FileVersion)
	}
	mc, err := j.ModelConfig()
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if err := mc.Validate(); err != nil {
		return fmt.Errorf("%w: model: %w", ErrInvalid, err)
	}
	switch {
	case j.Steps <= 0:
		return bad("steps must be positive, got %d", j.Steps)
	case j.BatchSize <= 0:
		return bad("batch_size must be positive, got %d", j.BatchSize)
	case !(j.LR > 0):
		return bad("lr must be positive, got %v", j.LR)
	case j.WarmupSteps < 0 || j.WarmupSteps > j.Steps:
		return bad("warmup_steps must be in [0, steps=%d], got %d", j.Steps, j.WarmupSteps)
	case j.WeightDecay < 0:
		return bad("weight_decay must be >= 0, got %v", j.WeightDecay)
	case j.ClipNorm < 0:
		return bad("clip_norm must be >= 0, got %v", j.ClipNorm)
	case j.EvalEvery < 0 || j.EvalBatches < 0 || j.CheckpointEvery < 0 || j.KeepCheckpoints < 0:
		return bad("eval_every, eval_batches, checkpoint_every and keep_checkpoints must be >= 0")
	case j.CheckpointDir == "":
		return bad("checkpoint_dir must be set")
	case j.Threads < 0 || j.Threads > 4*runtime.NumCPU():
		return bad("threads must be in [0, %d], got %d", 4*runtime.NumCPU(), j.Threads)
	case j.AllReduce != "" && j.AllReduce != AllReduceAuto && j.AllReduce != AllReduceFlat && j.AllReduce != AllReduceHier:
		return bad("allreduce must be %s, %s or %s, got %q", AllReduceAuto, AllReduceFlat, AllReduceHier, j.AllReduce)
	}
	return nil
}

// Optim returns the optimiser settings of the job (docs/model.md §6).
func (j Job) Optim() model.OptimConfig {
	o := model.DefaultOptim(j.LR, j.Steps)
	if j.WarmupSteps > 0 {
		o.WarmupSteps = j.WarmupSteps
	}
	o.WeightDecay, o.ClipNorm = j.WeightDecay, j.ClipNorm
	return o
}

// Load reads a YAML job file over Default(). Unknown keys are errors, so
// a typo does not silently train the wrong model. Keys under model: override
// the preset's values.
func Load(path string) (Job, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Job{}, fmt.Errorf("job file: %w", err)
	}
	return Parse(path, b)
}

// Parse is Load on bytes; name is used in errors.
func Parse(name string, b []byte) (Job, error) {
	j := Default()
	// First pass: the preset, so model overrides land on its values.
	var head struct {
		Version int    `yaml:"version"`
		Preset  string `yaml:"preset"`
	}
	if err := yaml.Unmarshal(b, &head); err != nil {
		return Job{}, fmt.Errorf("%w: %s: %v", ErrInvalid, name, err)
	}
	if head.Version != FileVersion {
		return Job{}, fmt.Errorf("%w: %s: version is %d; this build reads version %d job files (add `version: %d`)",
			ErrInvalid, name, head.Version, FileVersion, FileVersion)
	}
	if head.Preset != "" {
		j.Preset = head.Preset
	}
	mc, err := model.Preset(j.Preset)
	if err != nil {
		return Job{}, fmt.Errorf("%w: %s: %w", ErrInvalid, name, err)
	}
	j.Model = mc
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&j); err != nil {
		return Job{}, fmt.Errorf("%w: %s: %v", ErrInvalid, name, err)
	}
	if m := j.Model.Mixers; j.Model.NLayer != len(m) && len(m) > 0 && j.Model.NLayer > 0 && uniform(m) {
		// n_layer given alone: grow or shrink a one-mixer stack to match.
		j.Model.Mixers = make([]string, j.Model.NLayer)
		for i := range j.Model.Mixers {
			j.Model.Mixers[i] = m[0]
		}
	}
	if j.AllReduce == AllReduceAuto {
		j.AllReduce = "" // one spelling of the default, so resumes compare equal
	}
	if err := j.Validate(); err != nil {
		return Job{}, fmt.Errorf("%s: %w", name, err)
	}
	return j, nil
}

func uniform(m []string) bool {
	for _, x := range m {
		if x != m[0] {
			return false
		}
	}
	return true
}
