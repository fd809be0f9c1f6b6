package train

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"github.com/bmojo/bmojo/internal/safetensors"
	"github.com/bmojo/bmojo/model"
)

// A checkpoint is a directory step-NNNNNNNN/ holding:
//
//	model.safetensors      weights, model.md §7 names, config JSON in metadata
//	optimizer.safetensors  AdamW moments as exp_avg.<name>, exp_avg_sq.<name>
//	trainer.json           step, seed, batch size, losses (StateVersion)
//
// It is written into step-N.tmp/ and renamed into place only when every file
// is durable, so a crash never leaves a half checkpoint under a final name
// and an existing good one is never overwritten.
const (
	WeightsFile  = "model.safetensors"
	OptimFile    = "optimizer.safetensors"
	StateFile    = "trainer.json"
	StateVersion = 1
	stepPrefix   = "step-"
)

// ErrNoCheckpoint means a directory holds no usable checkpoint.
var ErrNoCheckpoint = errors.New("no checkpoint found")

// State is trainer.json: what resuming needs beyond the tensors.
type State struct {
	Version   int       `json:"version"`
	Step      int       `json:"step"` // completed optimizer steps
	Seed      uint64    `json:"seed"`
	BatchSize int       `json:"batch_size"`
	SeqLen    int       `json:"seq_len"`
	Skipped   int       `json:"skipped_steps"`
	Losses    []float64 `json:"train_losses"` // one per completed step
	ValLoss   float64   `json:"val_loss,omitempty"`
}

// Checkpoint is a loaded checkpoint.
type Checkpoint struct {
	Dir    string
	Config model.Config
	Params []float64
	M, V   []float64
	State  State
}

func stepDir(root string, step int) string {
	return filepath.Join(root, fmt.Sprintf("%s%08d", stepPrefix, step))
}

// SaveCheckpoint writes ck under root/step-N atomically.
func SaveCheckpoint(root string, ck Checkpoint) (string, error) {
	final := stepDir(root, ck.State.Step)
	if _, err := os.Stat(final); err == nil {
		return "", fmt.Errorf("checkpoint %s already exists; refusing to overwrite it", final)
	}
	tmp := final + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return "", fmt.Errorf("checkpoint: clear %s: %w", tmp, err)
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return "", fmt.Errorf("checkpoint: %w", err)
	}
	l := model.NewLayout(ck.Config)
	if err := safetensors.Write(filepath.Join(tmp, WeightsFile), l.ToTensors(ck.Params, ""), model.ConfigMetadata(ck.Config)); err != nil {
		return "", fmt.Errorf("checkpoint: %w", err)
	}
	ts := append(l.ToTensors(ck.M, "exp_avg."), l.ToTensors(ck.V, "exp_avg_sq.")...)
	if err := safetensors.Write(filepath.Join(tmp, OptimFile), ts, map[string]string{"step": strconv.Itoa(ck.State.Step)}); err != nil {
		return "", fmt.Errorf("checkpoint: %w", err)
	}
	st := ck.State
	st.Version = StateVersion
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return "", fmt.Errorf("checkpoint: encode state: %w", err)
	}
	if err := writeFileSync(filepath.Join(tmp, StateFile), b); err != nil {
		return "", fmt.Errorf("checkpoint: %w", err)
	}
	if err := syncDir(tmp); err != nil {
		return "", fmt.Errorf("checkpoint: %w", err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return "", fmt.Errorf("checkpoint: %w", err)
	}
	if err := syncDir(root); err != nil {
		return "", fmt.Errorf("checkpoint: %w", err)
	}
	return final, nil
}

func writeFileSync(path string, b []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// ListCheckpoints returns the complete checkpoint directories under root,
// newest first.
func ListCheckpoints(root string) ([]string, error) {
	ents, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("checkpoint dir: %w", err)
	}
	type c struct {
		step int
		path string
	}
	var cs []c
	for _, e := range ents {
		name := e.Name()
		if !e.IsDir() || !strings.HasPrefix(name, stepPrefix) || strings.HasSuffix(name, ".tmp") {
			continue
		}
		n, err := strconv.Atoi(strings.TrimPrefix(name, stepPrefix))
		if err != nil {
			continue
		}
		cs = append(cs, c{n, filepath.Join(root, name)})
	}
	sort.Slice(cs, func(i, j int) bool { return cs[i].step > cs[j].step })
	out := make([]string, len(cs))
	for i, x := range cs {
		out[i] = x.path
	}
	return out, nil
}

// LoadCheckpoint reads and cross-checks one checkpoint directory.
func LoadCheckpoint(dir string) (*Checkpoint, error) {
	c, params, err := model.LoadWeights(filepath.Join(dir, WeightsFile))
	if err != nil {
		return nil, err
	}
	ck := &Checkpoint{Dir: dir, Config: c, Params: params}
	of, err := safetensors.Read(filepath.Join(dir, OptimFile))
	if err != nil {
		return nil, err
	}
	l := model.NewLayout(c)
	if ck.M, err = l.FromFile(of, "exp_avg."); err != nil {
		return nil, err
	}
	if ck.V, err = l.FromFile(of, "exp_avg_sq."); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(filepath.Join(dir, StateFile))
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	if err := json.Unmarshal(b, &ck.State); err != nil {
		return nil, fmt.Errorf("checkpoint: %s: %w", filepath.Join(dir, StateFile), err)
	}
	if ck.State.Version != StateVersion {
		return nil, fmt.Errorf("checkpoint: %s: state version %d, this build reads %d", dir, ck.State.Version, StateVersion)
	}
	if s := of.Metadata["step"]; s != strconv.Itoa(ck.State.Step) {
		return nil, fmt.Errorf("checkpoint: %s: optimizer state is of step %q but trainer.json says %d", dir, s, ck.State.Step)
	}
	return ck, nil
}

// LatestCheckpoint loads the newest checkpoint under root that reads back
// cleanly. Each one skipped is reported to warn (a corrupted or partial
// checkpoint falls back to the previous good one).
func LatestCheckpoint(root string, warn func(dir string, err error)) (*Checkpoint, error) {
	dirs, err := ListCheckpoints(root)
	if err != nil {
		return nil, err
	}
	for _, d := range dirs {
		ck, err := LoadCheckpoint(d)
		if err == nil {
			return ck, nil
		}
		if warn != nil {
			warn(d, err)
		}
	}
	return nil, fmt.Errorf("%w in %s", ErrNoCheckpoint, root)
}

// pruneCheckpoints keeps the newest keep checkpoints (keep 0 = all).
func pruneCheckpoints(root string, keep int) error {
	if keep <= 0 {
		return nil
	}
	dirs, err := ListCheckpoints(root)
	if err != nil {
		return err
	}
	for i := keep; i < len(dirs); i++ {
		if err := os.RemoveAll(dirs[i]); err != nil {
			return fmt.Errorf("checkpoint: prune %s: %w", dirs[i], err)
		}
	}
	return nil
}

// LoadModel reads the weights a user's --checkpoint argument names: a
// .safetensors file, a step-N directory, or a checkpoint root whose newest
// good checkpoint is used (warn reports each one skipped). It returns the
// file the weights came from.
func LoadModel(path string, warn func(dir string, err error)) (model.Config, []float64, string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return model.Config{}, nil, "", fmt.Errorf("checkpoint: %w", err)
	}
	weights := path
	if st.IsDir() {
		weights = filepath.Join(path, WeightsFile)
		if _, err := os.Stat(weights); err != nil {
			ck, err := LatestCheckpoint(path, warn)
			if err != nil {
				return model.Config{}, nil, "", fmt.Errorf("checkpoint: %w (want a %s file, a step-N checkpoint directory or a directory of them)", err, WeightsFile)
			}
			return ck.Config, ck.Params, filepath.Join(ck.Dir, WeightsFile), nil
		}
	}
	c, params, err := model.LoadWeights(weights)
	if err != nil {
		return model.Config{}, nil, "", err
	}
	return c, params, weights, nil
}
