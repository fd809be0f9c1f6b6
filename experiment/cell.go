package experiment

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/bmojo/bmojo/experiment/mqar"
	"github.com/bmojo/bmojo/internal/fsutil"
	"github.com/bmojo/bmojo/model"
)

// Version is part of every cell's hash: bump it when a change to the code
// changes what a cell computes, so old cached results are not reused.
const Version = 3

// Cell kinds.
const (
	KindMQAR = "mqar"
	KindLM   = "lm"
)

// MixEntry is one training setting and its example count.
type MixEntry struct {
	Setting  mqar.Setting `json:"setting"`
	Examples int          `json:"examples"`
}

// Cell is one training run and its evaluation: everything that decides
// what it computes, and nothing else (not the device, not the output
// paths), so that its hash names its result.
type Cell struct {
	Version int       `json:"version"`
	Kind    string    `json:"kind"`
	Model   ModelSpec `json:"model"`
	LR      float64   `json:"lr"`
	Seed    uint64    `json:"seed"`  // init and training-data seed (< 2^31)
	Batch   int       `json:"batch"` // sequences per step

	// MQAR cells: train on Mix for Epochs (a batch never mixes settings;
	// rows shorter than the longest setting are padded with unlabelled
	// filler), test on Test with TestExamples each from TestSeed.
	Mix          []MixEntry     `json:"mix,omitempty"`
	Epochs       int            `json:"epochs,omitempty"`
	Test         []mqar.Setting `json:"test,omitempty"`
	TestExamples int            `json:"test_examples,omitempty"`
	TestSeed     uint64         `json:"test_seed,omitempty"`
	Noise        bool           `json:"noise,omitempty"`

	// LM cells: the preset size, the dataset (DataID names its content),
	// the training length and steps, the evaluation lengths, the windows
	// evaluated per length (0 = all) or, when EvalSpan is set, the tokens
	// scored at every length (the first EvalSpan tokens of the validation
	// split, cut into EvalSpan/T windows of each length T, so that every
	// length scores the same tokens and only the context differs), the
	// position buckets' width, and
	// state passing (mamba: each sequence starts from the final state of
	// an unrelated one).
	Size         string `json:"size,omitempty"`
	Data         string `json:"data,omitempty"`
	DataID       string `json:"data_id,omitempty"`
	Vocab        int    `json:"vocab,omitempty"` // the dataset's vocabulary, padded (tokenizer.PadVocab)
	TrainT       int    `json:"train_t,omitempty"`
	Steps        int    `json:"steps,omitempty"`
	EvalT        []int  `json:"eval_t,omitempty"`
	EvalWindows  int    `json:"eval_windows,omitempty"`
	EvalSpan     int    `json:"eval_span,omitempty"`
	Bucket       int    `json:"bucket,omitempty"`
	StatePassing bool   `json:"state_passing,omitempty"`
}

// Hash is the first 16 hex digits of the SHA-256 of the cell's JSON
// (struct order, so stable); Data (a path) is left out, DataID stands for it.
func (c Cell) Hash() string {
	c.Data = ""
	b, _ := json.Marshal(c) // a Cell always encodes
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:8])
}

// WindowsAt is the number of validation windows an LM cell evaluates at
// length T (0 = all of them).
func (c Cell) WindowsAt(T int) int {
	if c.EvalSpan > 0 && T > 0 {
		return c.EvalSpan / T
	}
	return c.EvalWindows
}

// Name is a short human label for logs and progress.
func (c Cell) Name() string {
	s := fmt.Sprintf("%s %s d=%d lr=%g", c.Kind, c.Model.Family, c.Model.DModel, c.LR)
	if c.Kind == KindLM {
		s = fmt.Sprintf("lm %s-%s T=%d lr=%g", c.Model.Family, c.Size, c.TrainT, c.LR)
		if c.StatePassing {
			s += " state-passing"
		}
	}
	if c.Model.Memory >= 0 || c.Model.SelectPerChunk >= 0 {
		s += fmt.Sprintf(" M=%d k_sel=%d", c.Model.Memory, c.Model.SelectPerChunk)
	}
	return s
}

// MaxTrainT is the longest training setting of an MQAR cell (rows are
// padded to it).
func (c Cell) MaxTrainT() int {
	t := 0
	for _, m := range c.Mix {
		t = max(t, m.Setting.T)
	}
	return t
}

// MaxTestT is the longest test setting of an MQAR cell.
func (c Cell) MaxTestT() int {
	t := 0
	for _, s := range c.Test {
		t = max(t, s.T)
	}
	return t
}

// ModelConfig is the cell's model.
func (c Cell) ModelConfig(vocab int) (model.Config, error) {
	switch c.Kind {
	case KindMQAR:
		return MQARModel(c.Model, c.MaxTrainT(), c.MaxTestT())
	case KindLM:
		return LMModel(c.Model, c.Size, max(vocab, c.Vocab), c.TrainT, slices.Max(c.EvalT))
	}
	return model.Config{}, fmt.Errorf("%w: unknown cell kind %q", ErrSpec, c.Kind)
}

// Validate checks the spec without side effects; errors name the flag.
func (c Cell) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrSpec, c.Name(), fmt.Sprintf(format, a...))
	}
	if !(c.LR > 0) || math.IsInf(c.LR, 0) {
		return bad("--lr must be positive, got %v", c.LR)
	}
	if c.Batch <= 0 {
		return bad("--batch-size must be positive, got %d", c.Batch)
	}
	if c.Seed >= mqar.TestSeedBase {
		return bad("--seed %d must be below 2^31 (the test seeds are above)", c.Seed)
	}
	switch c.Kind {
	case KindMQAR:
		if len(c.Mix) == 0 || len(c.Test) == 0 {
			return bad("--train-mix and the test settings must not be empty")
		}
		for _, m := range c.Mix {
			if err := m.Setting.Validate(); err != nil {
				return bad("--train-mix: %v", err)
			}
			if m.Examples <= 0 {
				return bad("--train-mix: setting %v has %d examples", m.Setting, m.Examples)
			}
		}
		for _, s := range c.Test {
			if err := s.Validate(); err != nil {
				return bad("test setting: %v", err)
			}
		}
		if c.Epochs <= 0 || c.TestExamples <= 0 {
			return bad("--epochs and --test-examples must be positive")
		}
		if err := (mqar.Source{Seed: c.TestSeed}).Check(mqar.Test); err != nil {
			return bad("--test-seed: %v", err)
		}
	case KindLM:
		if c.TrainT <= 0 || c.Steps <= 0 || len(c.EvalT) == 0 || c.Bucket <= 0 || c.EvalWindows < 0 {
			return bad("--seq-len, --steps, --eval-len and the bucket must be positive")
		}
		for _, t := range c.EvalT {
			if t <= 0 {
				return bad("--eval-len %d must be positive", t)
			}
			if c.EvalSpan < 0 || c.EvalSpan%t != 0 {
				return bad("the evaluation span of %d tokens is not a whole number of windows of --eval-len %d: every length must score the same tokens", c.EvalSpan, t)
			}
		}
		if c.StatePassing && c.Model.Family != "mamba" {
			return bad("--state-passing is for the mamba family: it runs an unrelated prefix through the model, which attention layers would also see")
		}
	default:
		return bad("unknown kind %q", c.Kind)
	}
	_, err := c.ModelConfig(256)
	return err
}

// ParseMix parses "T:K:N,T:K:N,...".
func ParseMix(s string) ([]MixEntry, error) {
	var out []MixEntry
	for _, f := range strings.Split(s, ",") {
		p := strings.Split(strings.TrimSpace(f), ":")
		if len(p) != 3 {
			return nil, fmt.Errorf("%w: --train-mix entry %q: want T:K:EXAMPLES", ErrSpec, f)
		}
		var v [3]int
		for i := range p {
			n, err := strconv.Atoi(p[i])
			if err != nil {
				return nil, fmt.Errorf("%w: --train-mix entry %q: %w", ErrSpec, f, err)
			}
			v[i] = n
		}
		out = append(out, MixEntry{Setting: mqar.Setting{T: v[0], K: v[1]}, Examples: v[2]})
	}
	return out, nil
}

// ParseSettings parses "T:K,T:K,...".
func ParseSettings(s string) ([]mqar.Setting, error) {
	var out []mqar.Setting
	for _, f := range strings.Split(s, ",") {
		var t, k int
		if _, err := fmt.Sscanf(strings.TrimSpace(f), "%d:%d", &t, &k); err != nil {
			return nil, fmt.Errorf("%w: setting %q: want T:K: %w", ErrSpec, f, err)
		}
		out = append(out, mqar.Setting{T: t, K: k})
	}
	return out, nil
}

// Cache holds finished cells: DIR/<hash>/cell.json (the spec, written
// before the run), result.json (written atomically when the cell
// finishes: its presence means done) and ckpt/ (the cell's checkpoint).
// With Checkpoints set, checkpoints go to Checkpoints/<hash>/ckpt instead
// (beside another copy of cell.json), so that the results alone, a few KB
// per cell, can be carried between machines.
type Cache struct {
	Dir         string
	Checkpoints string
}

// ErrNotCached: the cell has no result yet.
var ErrNotCached = errors.New("cell not cached")

// CellDir is the cell's directory.
func (k Cache) CellDir(c Cell) string { return filepath.Join(k.Dir, c.Hash()) }

// ckptCellDir is the directory above the cell's checkpoints.
func (k Cache) ckptCellDir(c Cell) string {
	if k.Checkpoints == "" {
		return k.CellDir(c)
	}
	return filepath.Join(k.Checkpoints, c.Hash())
}

// CheckpointDir is the root of the cell's checkpoints.
func (k Cache) CheckpointDir(c Cell) string { return filepath.Join(k.ckptCellDir(c), "ckpt") }

// Load returns the cell's result, or ErrNotCached.
func (k Cache) Load(c Cell) (Result, error) {
	p := filepath.Join(k.CellDir(c), "result.json")
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return Result{}, fmt.Errorf("%w: %s", ErrNotCached, c.Name())
	}
	if err != nil {
		return Result{}, fmt.Errorf("experiment: cache: %w", err)
	}
	var r Result
	if err := json.Unmarshal(b, &r); err != nil {
		return Result{}, fmt.Errorf("experiment: cache: %s: %w (delete it to recompute the cell)", p, err)
	}
	if r.Hash != c.Hash() {
		return Result{}, fmt.Errorf("experiment: cache: %s holds cell %s, not %s (delete it to recompute)", p, r.Hash, c.Hash())
	}
	return r, nil
}

// Begin writes the cell's spec into its directory (so that a child process
// or `bmojo eval --task mqar` can read it) and returns the directory.
func (k Cache) Begin(c Cell) (string, error) {
	dir := k.CellDir(c)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("experiment: cache: %w", err)
	}
	b, _ := json.MarshalIndent(c, "", "  ")
	for _, d := range []string{dir, k.ckptCellDir(c)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return "", fmt.Errorf("experiment: cache: %w", err)
		}
		if _, err := fsutil.WriteBytes(filepath.Join(d, "cell.json"), append(b, '\n')); err != nil {
			return "", fmt.Errorf("experiment: cache: %w", err)
		}
	}
	return dir, nil
}

// Store writes the cell's result atomically: the cell is done.
func (k Cache) Store(r Result) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("experiment: cache: encode result: %w", err)
	}
	dir := filepath.Join(k.Dir, r.Hash)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("experiment: cache: %w", err)
	}
	if _, err := fsutil.WriteBytes(filepath.Join(dir, "result.json"), append(b, '\n')); err != nil {
		return fmt.Errorf("experiment: cache: %w", err)
	}
	return nil
}

// ReadCell reads the cell.json of a cell directory, or of the cell
// directory above a checkpoint path (DIR/ckpt/step-N/model.safetensors).
func ReadCell(path string) (Cell, string, error) {
	for d := path; ; {
		p := filepath.Join(d, "cell.json")
		if b, err := os.ReadFile(p); err == nil {
			var c Cell
			if err := json.Unmarshal(b, &c); err != nil {
				return Cell{}, "", fmt.Errorf("experiment: %s: %w", p, err)
			}
			return c, d, nil
		}
		up := filepath.Dir(d)
		if up == d {
			return Cell{}, "", fmt.Errorf("%w: no cell.json at or above %s", ErrNotCached, path)
		}
		d = up
	}
}

// SettingResult is an MQAR cell's score on one test setting.
type SettingResult struct {
	Setting  mqar.Setting `json:"setting"`
	Accuracy float64      `json:"accuracy"`
	Loss     Float        `json:"loss"`
	Examples int          `json:"examples"`
}

// Bucket is the mean loss over positions [Start, End) of the windows.
type Bucket struct {
	Start int   `json:"start"`
	End   int   `json:"end"`
	Loss  Float `json:"loss"`
}

// LengthResult is an LM cell's loss at one evaluation length.
type LengthResult struct {
	T        int      `json:"t"`
	Windows  int      `json:"windows"`
	MeanLoss Float    `json:"mean_loss"`
	Buckets  []Bucket `json:"buckets"`
	Note     string   `json:"note,omitempty"` // why a length was not evaluated
}

// Result is a finished cell.
type Result struct {
	Hash        string          `json:"hash"`
	Cell        Cell            `json:"cell"`
	Device      string          `json:"device"`
	WallSeconds float64         `json:"wall_seconds"`
	TrainTokens int64           `json:"train_tokens"` // positions trained on, padding included
	Steps       int             `json:"steps"`
	Skipped     int             `json:"skipped_steps"`
	Params      int             `json:"params"`
	TrainLoss   []Float         `json:"train_loss"` // mean over each tenth of training
	MQAR        []SettingResult `json:"mqar,omitempty"`
	LM          []LengthResult  `json:"lm,omitempty"`
	Checkpoint  string          `json:"checkpoint"` // relative to the cell directory
}

// MeanAccuracy is the mean over test settings (the lr sweep picks by it).
func (r Result) MeanAccuracy() float64 {
	if len(r.MQAR) == 0 {
		return 0
	}
	var s float64
	for _, x := range r.MQAR {
		s += x.Accuracy
	}
	return s / float64(len(r.MQAR))
}

// Accuracy is the accuracy at setting s, or false.
func (r Result) Accuracy(s mqar.Setting) (SettingResult, bool) {
	for _, x := range r.MQAR {
		if x.Setting == s {
			return x, true
		}
	}
	return SettingResult{}, false
}

// Float is a float64 that encodes NaN and ±Inf (a diverged run's loss) as
// JSON null, and decodes null as NaN.
type Float float64

// MarshalJSON implements json.Marshaler.
func (f Float) MarshalJSON() ([]byte, error) {
	if math.IsNaN(float64(f)) || math.IsInf(float64(f), 0) {
		return []byte("null"), nil
	}
	return json.Marshal(float64(f))
}

// UnmarshalJSON implements json.Unmarshaler.
func (f *Float) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*f = Float(math.NaN())
		return nil
	}
	var v float64
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	*f = Float(v)
	return nil
}

// tenths averages losses over ten equal spans (fewer for short runs); a
// span with no finite loss is NaN.
func tenths(losses []float64) []Float {
	n := min(10, len(losses))
	out := make([]Float, 0, n)
	for i := range n {
		a, b := i*len(losses)/n, (i+1)*len(losses)/n
		var s float64
		var k int
		for _, x := range losses[a:b] {
			if !math.IsNaN(x) && !math.IsInf(x, 0) {
				s += x
				k++
			}
		}
		if k > 0 {
			out = append(out, Float(s/float64(k)))
		} else {
			out = append(out, Float(math.NaN()))
		}
	}
	return out
}

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
