// Package checkpoint is the only code that writes, reads, lists, verifies
// and prunes bmojo checkpoints. Both the single-process trainer and the
// workers save and resume through it, and eval and generate load through
// it; every load of a checkpoint checks every file it reads against its
// SHA-256 (only a bare weights file exported by another tool, with no
// manifest beside it, has nothing to be checked against).
//
// A checkpoint is a directory root/step-NNNNNNNN/ (NNNNNNNN is State.DataStep,
// zero-padded to 8 digits), or root/step-NNNNNNNN.attempt-K/ (below),
// holding:
//
//	model.safetensors      weights: docs/model.md §7 names (model.Layout), the
//	                       model config JSON under the "config" metadata key
//	optimizer.safetensors  AdamW moments as exp_avg.<name> and exp_avg_sq.<name>
//	trainer.json           State: data step, optimizer step, seed, batch, losses
//	manifest.json          Manifest: the step, the config and every other
//	                       file's size and SHA-256
//
// Save writes everything into step-N.tmp/, hashing each file while it
// writes it and fsyncing it, writes manifest.json last, then renames the
// directory into place and fsyncs the root: a crash never leaves a partial
// checkpoint under a final name, and a good one is never overwritten. The
// tensors are float32 end to end, as the model holds them.
//
// # Several writers: attempts
//
// In a distributed job the checkpoint that counts is the one whose
// manifest rank 0 commits to etcd, fenced on its ring (the worker's
// transaction). A rank 0 whose ring was superseded may still be running: it
// can leave a complete step-N it can never commit (its transaction is
// refused, or it dies or loses etcd before it lands), and the new ring's
// rank 0 may then checkpoint the same step, with other bytes. Neither
// writer may touch the other's directory: the stale one might be paused
// mid-operation, and a directory a committed manifest names must never
// change. So such a writer uses SaveFresh: it writes into a temporary
// directory of its own (step-N.tmp-<random>) and renames it to the first
// free name of step-N, step-N.attempt-2, step-N.attempt-3, ... (a rename
// onto a complete, non-empty directory fails, so two writers never take
// one name), and commits the name it got: etcd's manifest says which
// attempt of a step is the checkpoint. Nothing is ever renamed over,
// rewritten or removed to make room; a directory nobody committed is an
// orphan that RemoveOlder removes once its step is older than the
// checkpoints kept, like any other. (Reusing an existing directory whose
// bytes happen to match was not done: it saves one write in a rare case,
// and would tie a committed manifest to a directory another writer owns.)
// List, Latest and LoadLatest, which have no etcd, see every attempt and
// take the highest (the last written) of a step.
//
// The package owns the directory layout, the manifest and trainer.json; it
// must not touch anything under root but step-N[.attempt-K] directories
// (and their temporary leftovers), whatever a manifest says. It knows
// nothing of etcd: a distributed job commits the Manifest that SaveFresh
// returns (and passes it back to LoadWith, after DirOf has checked the
// directory it names), but that transaction is the worker's.
package checkpoint

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

	"github.com/bmojo/bmojo/internal/fsutil"
	"github.com/bmojo/bmojo/internal/safetensors"
	"github.com/bmojo/bmojo/model"
)

// File names inside a checkpoint directory.
const (
	WeightsFile  = "model.safetensors"
	OptimFile    = "optimizer.safetensors"
	StateFile    = "trainer.json"
	ManifestFile = "manifest.json"
)

// Format versions. A checkpoint names its manifest format and version, and
// trainer.json its version; Load refuses others with an error saying which
// build wrote what.
const (
	ManifestFormat  = "bmojo-checkpoint"
	ManifestVersion = 1
	// StateVersion 2 stores the data step and the optimizer step apart;
	// version 1 ("step" = the data step, the optimizer step derived as
	// step - skipped_steps) is still read and migrated on load.
	StateVersion = 2
)

// Prefixes of the optimizer moments' tensor names in optimizer.safetensors.
const (
	prefixM = "exp_avg."
	prefixV = "exp_avg_sq."
)

// Sentinel errors. Every error of this package about a checkpoint's content
// wraps one of them and names the directory or file.
var (
	// ErrNoCheckpoint: a directory holds no checkpoint that loads.
	ErrNoCheckpoint = errors.New("no checkpoint found")
	// ErrExists: Save was asked to write a step that is already there.
	ErrExists = errors.New("checkpoint already exists")
	// ErrManifest: manifest.json is missing, malformed, lists no files, or
	// disagrees with the directory it is in.
	ErrManifest = errors.New("invalid checkpoint manifest")
	// ErrDamaged: a file's size or SHA-256 differs from its manifest entry.
	ErrDamaged = errors.New("checkpoint file does not match its manifest")
	// ErrContent: the files verify but do not fit together (a tensor
	// missing or of the wrong shape for the config, steps that disagree,
	// a trainer.json that does not parse).
	ErrContent = errors.New("checkpoint content is inconsistent")
)

// State is trainer.json: what resuming needs beyond the tensors.
//
// "Step" alone is ambiguous; a checkpoint stores two. DataStep counts the
// training steps completed, skipped ones included: it is how many global
// batches the run has consumed, the next step trains on global batch
// DataStep, and the directory is named after it. OptimizerStep counts the
// AdamW updates actually applied (model.Optimizer.Step): a step whose
// gradient is not finite is skipped and does not advance it. The learning
// rate schedule and Adam's bias correction follow OptimizerStep.
type State struct {
	Version       int       `json:"version"`
	DataStep      int       `json:"data_step"`
	OptimizerStep int       `json:"optimizer_step"`
	Seed          uint64    `json:"seed"`
	BatchSize     int       `json:"batch_size"` // global batch, sequences
	SeqLen        int       `json:"seq_len"`
	Skipped       int       `json:"skipped_steps"`      // steps skipped for a non-finite gradient
	Losses        []float64 `json:"train_losses"`       // one per completed step when the trainer keeps them (the single-process one does)
	ValLoss       float64   `json:"val_loss,omitempty"` // validation loss at DataStep, 0 if none was computed
	// Job is the job file (YAML) the run was started with: a resume must
	// bring the same settings (job.Job.Diff). Empty in older checkpoints.
	Job string `json:"job,omitempty"`
}

// Checkpoint is one checkpoint in memory.
type Checkpoint struct {
	Dir    string // where it was loaded from; ignored by Save
	Config model.Config
	Params []float32 // model.Layout order
	M, V   []float32 // AdamW first and second moments, Layout order
	State  State
}

// File is one file of a checkpoint as its manifest records it.
type File struct {
	Name   string `json:"name"` // a bare file name inside the checkpoint directory
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"` // lower-case hex
}

// Manifest is manifest.json: what a checkpoint must hold. A distributed job
// also commits it to etcd (internal/job.Manifest).
type Manifest struct {
	Format  string `json:"format"`  // ManifestFormat
	Version int    `json:"version"` // ManifestVersion
	Step    int    `json:"step"`    // State.DataStep, also in the directory's name
	Config  string `json:"config"`  // model config JSON, as in the weights' metadata
	Files   []File `json:"files"`   // every file but manifest.json itself
	// Dir is the directory the manifest was read from or written to. It is
	// not stored: a checkpoint directory can be moved.
	Dir string `json:"-"`
}

// StepDir is the directory of the checkpoint of data step step under root.
func StepDir(root string, step int) string {
	return filepath.Join(root, dirName(step))
}

// AttemptDir is the directory of the attempt-th checkpoint of data step
// step under root, as SaveFresh names it: attempt 1 is StepDir, attempt k
// > 1 is step-NNNNNNNN.attempt-k.
func AttemptDir(root string, step, attempt int) string {
	if attempt <= 1 {
		return StepDir(root, step)
	}
	return filepath.Join(root, fmt.Sprintf("%s%s%d", dirName(step), attemptSep, attempt))
}

func dirName(step int) string { return fmt.Sprintf("step-%08d", step) }

// maxAttempts bounds the directories SaveFresh tries for one step: each is
// a complete checkpoint some writer left, so this many means something
// else is wrong.
const maxAttempts = 100

// Save writes ck under root/step-N (N = ck.State.DataStep), atomically and
// durably, and returns its manifest (with Dir set). It refuses to replace an
// existing step-N (ErrExists). A step-N.tmp left by a crash is replaced; on
// error the temporary directory is removed. It is for a writer that is
// alone under root (the single-process trainer); see SaveFresh otherwise.
func Save(root string, ck Checkpoint) (Manifest, error) {
	if err := ck.check(); err != nil {
		return Manifest{}, err
	}
	final := StepDir(root, ck.State.DataStep)
	if _, err := os.Lstat(final); err == nil {
		return Manifest{}, fmt.Errorf("checkpoint: save: %s: %w; refusing to overwrite it", final, ErrExists)
	}
	tmp := final + tmpSuffix
	if err := os.RemoveAll(tmp); err != nil {
		return Manifest{}, fmt.Errorf("checkpoint: save: clear %s: %w", tmp, err)
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return Manifest{}, fmt.Errorf("checkpoint: save: %w", err)
	}
	man, err := writeDir(tmp, ck)
	if err == nil {
		err = os.Rename(tmp, final)
	}
	if err != nil {
		os.RemoveAll(tmp)
		return Manifest{}, fmt.Errorf("checkpoint: save: %w", err)
	}
	if err := fsutil.SyncDir(root); err != nil {
		return Manifest{}, fmt.Errorf("checkpoint: save: %s: %w", final, err)
	}
	man.Dir = final
	return man, nil
}

// SaveFresh is Save for a writer that may not be alone under root: a
// distributed job's rank 0, where a rank 0 of a superseded ring may still
// run (see the package doc). It writes ck into a temporary directory of
// its own (step-N.tmp-<random>: two writers never share one), then renames
// it to the first of AttemptDir(root, N, 1), (root, N, 2), ... that does
// not exist. It never modifies, replaces or removes an existing directory;
// the returned manifest's Dir says where ck went, and the caller commits
// that (a directory nobody commits is an orphan, removed by RemoveOlder
// once older than the checkpoints kept).
func SaveFresh(root string, ck Checkpoint) (Manifest, error) {
	if err := ck.check(); err != nil {
		return Manifest{}, err
	}
	step := ck.State.DataStep
	if err := os.MkdirAll(root, 0o755); err != nil {
		return Manifest{}, fmt.Errorf("checkpoint: save: %w", err)
	}
	tmp, err := os.MkdirTemp(root, dirName(step)+tmpSuffix+"-")
	if err != nil {
		return Manifest{}, fmt.Errorf("checkpoint: save: %w", err)
	}
	man, err := writeDir(tmp, ck)
	if err == nil {
		err = os.Chmod(tmp, 0o755) // as Save's; MkdirTemp makes it 0700
	}
	for attempt := 1; err == nil; attempt++ {
		if attempt > maxAttempts {
			err = fmt.Errorf("%s and %d more attempt directories of step %d exist already", StepDir(root, step), maxAttempts-1, step)
			break
		}
		dir := AttemptDir(root, step, attempt)
		if _, lerr := os.Lstat(dir); lerr == nil {
			continue // another writer's (or an earlier attempt's): left as it is
		} else if !errors.Is(lerr, os.ErrNotExist) {
			err = lerr
			break
		}
		// A complete checkpoint directory is never empty, so a rename onto
		// one that appeared since the Lstat fails instead of replacing it.
		if rerr := os.Rename(tmp, dir); rerr != nil {
			if _, lerr := os.Lstat(dir); lerr == nil {
				continue // another writer took the name first
			}
			err = rerr
			break
		}
		if err := fsutil.SyncDir(root); err != nil {
			return Manifest{}, fmt.Errorf("checkpoint: save: %s: %w", dir, err)
		}
		man.Dir = dir
		return man, nil
	}
	os.RemoveAll(tmp)
	return Manifest{}, fmt.Errorf("checkpoint: save: %w", err)
}

// check refuses a checkpoint Save cannot write.
func (ck Checkpoint) check() error {
	st := ck.State
	if err := ck.Config.Validate(); err != nil {
		return fmt.Errorf("checkpoint: save: %w", err)
	}
	l := model.NewLayout(ck.Config)
	for _, v := range []struct {
		name string
		n    int
	}{{"parameters", len(ck.Params)}, {"first moments", len(ck.M)}, {"second moments", len(ck.V)}} {
		if v.n != l.Total {
			return fmt.Errorf("checkpoint: save: %d %s given, the config has %d parameters", v.n, v.name, l.Total)
		}
	}
	if st.DataStep < 0 || st.OptimizerStep < 0 || st.OptimizerStep > st.DataStep {
		return fmt.Errorf("checkpoint: save: data step %d, optimizer step %d: want 0 <= optimizer step <= data step", st.DataStep, st.OptimizerStep)
	}
	return nil
}

// writeDir writes ck's files into the empty directory tmp, hashing each
// while it writes it and fsyncing it, manifest.json last, and returns the
// manifest (Dir unset).
func writeDir(tmp string, ck Checkpoint) (Manifest, error) {
	st := ck.State
	l := model.NewLayout(ck.Config)
	meta := model.ConfigMetadata(ck.Config)
	man := Manifest{Format: ManifestFormat, Version: ManifestVersion, Step: st.DataStep, Config: meta[model.ConfigKey]}
	put := func(name string, write func(w io.Writer) error) error {
		d, err := fsutil.WriteFile(filepath.Join(tmp, name), write)
		if err != nil {
			return err
		}
		man.Files = append(man.Files, File{Name: name, Size: d.Size, SHA256: d.SHA256})
		return nil
	}
	if err := put(WeightsFile, func(w io.Writer) error {
		return safetensors.Encode(w, tensors(l, ck.Params, ""), meta)
	}); err != nil {
		return Manifest{}, err
	}
	if err := put(OptimFile, func(w io.Writer) error {
		ts := append(tensors(l, ck.M, prefixM), tensors(l, ck.V, prefixV)...)
		return safetensors.Encode(w, ts, map[string]string{"step": strconv.Itoa(st.DataStep)})
	}); err != nil {
		return Manifest{}, err
	}
	st.Version = StateVersion
	sj, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return Manifest{}, fmt.Errorf("encode %s: %w", StateFile, err)
	}
	if err := put(StateFile, func(w io.Writer) error { _, err := w.Write(append(sj, '\n')); return err }); err != nil {
		return Manifest{}, err
	}
	mj, err := json.MarshalIndent(man, "", "  ")
	if err != nil {
		return Manifest{}, fmt.Errorf("encode %s: %w", ManifestFile, err)
	}
	// The manifest goes last: a directory with a manifest has every file
	// it lists durable beside it.
	if _, err := fsutil.WriteBytes(filepath.Join(tmp, ManifestFile), append(mj, '\n')); err != nil {
		return Manifest{}, err
	}
	return man, nil
}

// tensors names the spans of the flat vector v after l's tensors (with
// prefix). The tensors share v's memory: nothing is copied.
func tensors(l *model.Layout, v []float32, prefix string) []safetensors.Tensor {
	out := make([]safetensors.Tensor, 0, len(l.Tensors))
	for _, t := range l.Tensors {
		out = append(out, safetensors.Tensor{Name: prefix + t.Name, Shape: t.Shape, Data: v[t.Offset : t.Offset+t.Size()]})
	}
	return out
}
