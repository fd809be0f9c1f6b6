package checkpoint

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/bmojo/bmojo/internal/fsutil"
	"github.com/bmojo/bmojo/internal/safetensors"
	"github.com/bmojo/bmojo/model"
)

// maxManifestBytes bounds manifest.json and trainer.json reads: a manifest
// is a few hundred bytes and trainer.json holds one loss per step, so a
// larger file is corrupt or hostile.
const maxManifestBytes = 64 << 20

// ReadManifest reads and checks dir/manifest.json (see Manifest.check); it
// does not read the files the manifest lists. A checkpoint that an older
// bmojo wrote before checkpoints carried a manifest (no manifest.json, a
// version 1 trainer.json) is migrated: its manifest is written once from
// its files as they are, after they have loaded and fit together.
func ReadManifest(dir string) (Manifest, error) {
	path := filepath.Join(dir, ManifestFile)
	b, err := readBounded(path)
	if errors.Is(err, os.ErrNotExist) && isLegacy(dir) {
		return seal(dir)
	}
	if errors.Is(err, os.ErrNotExist) {
		return Manifest{}, fmt.Errorf("checkpoint: %s: %w: no %s (the checkpoint was not completed or its manifest was lost); its files cannot be verified",
			dir, ErrManifest, ManifestFile)
	}
	if err != nil {
		return Manifest{}, fmt.Errorf("checkpoint: %w", err)
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return Manifest{}, fmt.Errorf("checkpoint: %s: %w: %v", path, ErrManifest, err)
	}
	if m.Format != ManifestFormat || m.Version != ManifestVersion {
		return Manifest{}, fmt.Errorf("checkpoint: %s: %w: format %q version %d, this build reads %q version %d (written by another bmojo? load it with the build that wrote it)",
			path, ErrManifest, m.Format, m.Version, ManifestFormat, ManifestVersion)
	}
	m.Dir = dir
	if err := m.check(); err != nil {
		return Manifest{}, err
	}
	return m, nil
}

// check refuses a manifest that cannot describe a checkpoint in m.Dir: no
// files, a name that is not a bare file name, a duplicate, a malformed
// hash, a required file missing, or a step other than the directory's.
func (m Manifest) check() error {
	where := filepath.Join(m.Dir, ManifestFile)
	if len(m.Files) == 0 {
		return fmt.Errorf("checkpoint: %s: %w: it lists no files", where, ErrManifest)
	}
	seen := map[string]bool{}
	for _, f := range m.Files {
		if !validName(f.Name) {
			return fmt.Errorf("checkpoint: %s: %w: file name %q is not a plain name inside the checkpoint directory", where, ErrManifest, f.Name)
		}
		if seen[f.Name] {
			return fmt.Errorf("checkpoint: %s: %w: %s is listed twice", where, ErrManifest, f.Name)
		}
		seen[f.Name] = true
		if b, err := hex.DecodeString(f.SHA256); err != nil || len(b) != 32 || strings.ToLower(f.SHA256) != f.SHA256 {
			return fmt.Errorf("checkpoint: %s: %w: %s: sha256 %q is not 64 lower-case hex digits", where, ErrManifest, f.Name, f.SHA256)
		}
		if f.Size < 0 {
			return fmt.Errorf("checkpoint: %s: %w: %s: negative size %d", where, ErrManifest, f.Name, f.Size)
		}
	}
	for _, name := range []string{WeightsFile, OptimFile, StateFile} {
		if !seen[name] {
			return fmt.Errorf("checkpoint: %s: %w: %s is not listed", where, ErrManifest, name)
		}
	}
	if step, _, ok := parseStepDir(filepath.Base(m.Dir)); ok && step != m.Step {
		return fmt.Errorf("checkpoint: %s: %w: step %d in a directory named for step %d", where, ErrManifest, m.Step, step)
	}
	if m.Step < 0 {
		return fmt.Errorf("checkpoint: %s: %w: negative step %d", where, ErrManifest, m.Step)
	}
	return nil
}

// validName: a bare file name, so a manifest can never point outside its
// directory.
func validName(name string) bool {
	return name != "" && name != "." && name != ".." && name != ManifestFile &&
		!strings.ContainsAny(name, `/\`) && filepath.Base(name) == name
}

func (m Manifest) file(name string) (File, bool) {
	i := slices.IndexFunc(m.Files, func(f File) bool { return f.Name == name })
	if i < 0 {
		return File{}, false
	}
	return m.Files[i], true
}

// Verify checks that every file dir/manifest.json lists is there with its
// size and SHA-256, streaming each file once. A manifest that lists no
// files is an error. It returns the manifest, with Dir set.
func Verify(dir string) (Manifest, error) {
	m, err := ReadManifest(dir)
	if err != nil {
		return Manifest{}, err
	}
	for _, f := range m.Files {
		path := filepath.Join(dir, f.Name)
		got, err := fsutil.HashFile(path)
		if err != nil {
			return Manifest{}, fmt.Errorf("checkpoint: %s: %w: %v", path, ErrDamaged, err)
		}
		if err := f.match(path, got); err != nil {
			return Manifest{}, err
		}
	}
	return m, nil
}

func (f File) match(path string, got fsutil.Digest) error {
	if got.Size != f.Size {
		return fmt.Errorf("checkpoint: %s: %w: %d bytes, the manifest says %d", path, ErrDamaged, got.Size, f.Size)
	}
	if got.SHA256 != f.SHA256 {
		return fmt.Errorf("checkpoint: %s: %w: sha256 %s…, the manifest says %s…", path, ErrDamaged, got.SHA256[:12], f.SHA256[:12])
	}
	return nil
}

// readVerified reads the file f of dir whole, checking its size before
// reading and its SHA-256 on the bytes read: one read, nothing unverified
// returned.
func readVerified(dir string, f File) ([]byte, error) {
	path := filepath.Join(dir, f.Name)
	fh, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %s: %w: %v", path, ErrDamaged, err)
	}
	defer fh.Close()
	st, err := fh.Stat()
	if err != nil {
		return nil, fmt.Errorf("checkpoint: %w", err)
	}
	if st.Size() != f.Size { // before allocating: a size is never trusted past the manifest's
		return nil, fmt.Errorf("checkpoint: %s: %w: %d bytes, the manifest says %d", path, ErrDamaged, st.Size(), f.Size)
	}
	b := make([]byte, f.Size)
	if _, err := io.ReadFull(fh, b); err != nil {
		return nil, fmt.Errorf("checkpoint: %s: %w: %v", path, ErrDamaged, err)
	}
	if err := f.match(path, fsutil.HashBytes(b)); err != nil {
		return nil, err
	}
	return b, nil
}

// Load reads the checkpoint in dir, checking every file against the size
// and SHA-256 in dir/manifest.json as it reads it, then that the files fit
// together. An error names the damaged file.
func Load(dir string) (*Checkpoint, error) {
	m, err := ReadManifest(dir)
	if err != nil {
		return nil, err
	}
	return load(dir, m)
}

// LoadWith is Load against m, a manifest kept elsewhere (the one a
// distributed job committed to etcd), instead of dir/manifest.json; m.Dir
// is ignored. Checkpoints written before manifest.json existed still load
// this way, against the manifest etcd holds for them.
func LoadWith(dir string, m Manifest) (*Checkpoint, error) {
	m.Dir = dir
	if err := m.check(); err != nil {
		return nil, err
	}
	return load(dir, m)
}

func load(dir string, m Manifest) (*Checkpoint, error) {
	for _, f := range m.Files {
		if f.Name == WeightsFile || f.Name == OptimFile || f.Name == StateFile {
			continue // checked below as they are read
		}
		// Listed but not read: it must still be intact.
		path := filepath.Join(dir, f.Name)
		got, err := fsutil.HashFile(path)
		if err != nil {
			return nil, fmt.Errorf("checkpoint: %s: %w: %v", path, ErrDamaged, err)
		}
		if err := f.match(path, got); err != nil {
			return nil, err
		}
	}
	// parse reads one listed file, verified, and parses it; one file's
	// bytes are held at a time.
	parse := func(name string) (*safetensors.File, error) {
		f, _ := m.file(name) // check() made sure it is listed
		b, err := readVerified(dir, f)
		if err != nil {
			return nil, err
		}
		sf, err := safetensors.Parse(filepath.Join(dir, name), b)
		if err != nil {
			return nil, fmt.Errorf("checkpoint: %w", err)
		}
		return sf, nil
	}
	ck := &Checkpoint{Dir: dir}
	wf, err := parse(WeightsFile)
	if err != nil {
		return nil, err
	}
	if ck.Config, ck.Params, err = weights(wf); err != nil {
		return nil, err
	}
	if m.Config != "" && m.Config != wf.Metadata[model.ConfigKey] {
		return nil, fmt.Errorf("checkpoint: %s: %w: the manifest's model config is not the weights' config", dir, ErrContent)
	}
	of, err := parse(OptimFile)
	if err != nil {
		return nil, err
	}
	l := model.NewLayout(ck.Config)
	if ck.M, err = gather(l, of, prefixM); err != nil {
		return nil, err
	}
	if ck.V, err = gather(l, of, prefixV); err != nil {
		return nil, err
	}
	for _, name := range of.Names {
		if !strings.HasPrefix(name, prefixM) && !strings.HasPrefix(name, prefixV) {
			return nil, fmt.Errorf("checkpoint: %s: %w: tensor %q is not an optimizer moment", of.Path, ErrContent, name)
		}
	}
	if s := of.Metadata["step"]; s != strconv.Itoa(m.Step) {
		return nil, fmt.Errorf("checkpoint: %s: %w: optimizer state of step %q, the manifest says %d", of.Path, ErrContent, s, m.Step)
	}
	sf, _ := m.file(StateFile)
	sb, err := readVerified(dir, sf)
	if err != nil {
		return nil, err
	}
	statePath := filepath.Join(dir, StateFile)
	if ck.State, err = decodeState(statePath, sb); err != nil {
		return nil, err
	}
	if ck.State.DataStep != m.Step {
		return nil, fmt.Errorf("checkpoint: %s: %w: data step %d, the manifest says %d", statePath, ErrContent, ck.State.DataStep, m.Step)
	}
	return ck, nil
}

// weights decodes a weights file: its config and its parameters.
func weights(f *safetensors.File) (model.Config, []float32, error) {
	s, ok := f.Metadata[model.ConfigKey]
	if !ok {
		return model.Config{}, nil, fmt.Errorf("checkpoint: %s: %w: no %q metadata (not a bmojo checkpoint?)", f.Path, ErrContent, model.ConfigKey)
	}
	c, err := model.ParseConfig(s)
	if err != nil {
		return model.Config{}, nil, fmt.Errorf("checkpoint: %s: %w", f.Path, err)
	}
	p, err := gather(model.NewLayout(c), f, "")
	if err != nil {
		return model.Config{}, nil, err
	}
	return c, p, nil
}

// gather copies the tensors of l (names with prefix) from f into one flat
// vector in Layout order, after checking that each is present with its
// shape: the vector is allocated only once the file has shown it holds that
// many elements, so a hostile config cannot make it allocate more.
func gather(l *model.Layout, f *safetensors.File, prefix string) ([]float32, error) {
	for _, t := range l.Tensors {
		st, ok := f.Tensors[prefix+t.Name]
		if !ok {
			return nil, fmt.Errorf("checkpoint: %s: %w: tensor %q is missing", f.Path, ErrContent, prefix+t.Name)
		}
		if !slices.Equal(st.Shape, t.Shape) || len(st.Data) != t.Size() {
			return nil, fmt.Errorf("checkpoint: %s: %w: tensor %q has shape %v, the config says %v", f.Path, ErrContent, prefix+t.Name, st.Shape, t.Shape)
		}
	}
	for name := range f.Tensors {
		if rest, ok := strings.CutPrefix(name, prefix); ok {
			if _, ok := l.Lookup(rest); !ok {
				return nil, fmt.Errorf("checkpoint: %s: %w: tensor %q is not part of this config", f.Path, ErrContent, name)
			}
		}
	}
	v := make([]float32, l.Total)
	for _, t := range l.Tensors {
		copy(v[t.Offset:t.Offset+t.Size()], f.Tensors[prefix+t.Name].Data)
	}
	return v, nil
}

// decodeState parses trainer.json, migrating version 1.
func decodeState(path string, b []byte) (State, error) {
	var s struct {
		State
		Step *int `json:"step"` // version 1's name for the data step
	}
	if err := json.Unmarshal(b, &s); err != nil {
		return State{}, fmt.Errorf("checkpoint: %s: %w: %v", path, ErrContent, err)
	}
	st := s.State
	switch st.Version {
	case 1:
		if s.Step == nil {
			return State{}, fmt.Errorf("checkpoint: %s: %w: version 1 without a step", path, ErrContent)
		}
		st.DataStep = *s.Step
		st.OptimizerStep = st.DataStep - st.Skipped
		st.Version = StateVersion
	case StateVersion:
	default:
		return State{}, fmt.Errorf("checkpoint: %s: %w: version %d, this build reads 1 and %d (written by a newer bmojo? resume with that build)",
			path, ErrContent, st.Version, StateVersion)
	}
	if st.DataStep < 0 || st.Skipped < 0 || st.Skipped > st.DataStep || st.OptimizerStep < 0 || st.OptimizerStep > st.DataStep {
		return State{}, fmt.Errorf("checkpoint: %s: %w: data step %d, optimizer step %d, skipped %d do not fit together",
			path, ErrContent, st.DataStep, st.OptimizerStep, st.Skipped)
	}
	return st, nil
}

func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxManifestBytes+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(b) > maxManifestBytes {
		return nil, fmt.Errorf("%s: %w: larger than %d bytes", path, ErrManifest, maxManifestBytes)
	}
	return b, nil
}

// Weights is what eval and generate need: the model and its weights.
type Weights struct {
	Config model.Config
	Params []float32 // Layout order
	Path   string    // the weights file they came from
}

// LoadWeights reads the weights a user's --checkpoint argument names:
//   - a checkpoint root: the newest checkpoint that verifies (Latest; warn
//     reports each one skipped);
//   - a step-N checkpoint directory;
//   - a model.safetensors file inside a checkpoint directory.
//
// Each time the weights file is checked against its manifest's SHA-256 as
// it is read. A .safetensors file in a directory with neither a manifest
// nor trainer.json (an export from another tool) has nothing to be checked
// against and is read as it is.
func LoadWeights(path string, warn func(dir string, err error)) (Weights, error) {
	st, err := os.Stat(path)
	if err != nil {
		return Weights{}, fmt.Errorf("checkpoint: %w", err)
	}
	if !st.IsDir() {
		dir := filepath.Dir(path)
		if isCheckpointDir(dir, ManifestFile, StateFile) {
			m, err := ReadManifest(dir)
			if err != nil {
				return Weights{}, err
			}
			return weightsOf(m, filepath.Base(path))
		}
		f, err := safetensors.Read(path)
		if err != nil {
			return Weights{}, fmt.Errorf("checkpoint: %w", err)
		}
		c, p, err := weights(f)
		if err != nil {
			return Weights{}, err
		}
		return Weights{Config: c, Params: p, Path: path}, nil
	}
	if isCheckpointDir(path, ManifestFile, StateFile, WeightsFile) {
		m, err := ReadManifest(path)
		if err != nil {
			return Weights{}, err
		}
		return weightsOf(m, WeightsFile)
	}
	m, err := Latest(path, warn)
	if err != nil {
		return Weights{}, fmt.Errorf("%w (want a %s file, a step-N checkpoint directory or a directory of them)", err, WeightsFile)
	}
	return weightsOf(m, WeightsFile)
}

// isCheckpointDir: dir is (or claims to be) one checkpoint rather than a
// root of them or a directory of exports: it is named step-N or holds one
// of the files names.
func isCheckpointDir(dir string, names ...string) bool {
	if _, _, ok := parseStepDir(filepath.Base(filepath.Clean(dir))); ok {
		return true
	}
	for _, name := range names {
		if _, err := os.Stat(filepath.Join(dir, name)); err == nil {
			return true
		}
	}
	return false
}

func weightsOf(m Manifest, name string) (Weights, error) {
	f, ok := m.file(name)
	if !ok {
		return Weights{}, fmt.Errorf("checkpoint: %s: %w: %s is not listed", filepath.Join(m.Dir, ManifestFile), ErrManifest, name)
	}
	b, err := readVerified(m.Dir, f)
	if err != nil {
		return Weights{}, err
	}
	path := filepath.Join(m.Dir, name)
	sf, err := safetensors.Parse(path, b)
	if err != nil {
		return Weights{}, fmt.Errorf("checkpoint: %w", err)
	}
	c, p, err := weights(sf)
	if err != nil {
		return Weights{}, err
	}
	return Weights{Config: c, Params: p, Path: path}, nil
}

// JobOf returns the job file (State.Job) recorded beside the weights file
// at weightsPath, read from its checkpoint's trainer.json and checked
// against the manifest's SHA-256: eval and generate learn the checkpoint's
// tokenizer from it. It is "" for a bare weights file with no trainer.json
// beside it and for checkpoints older than State.Job.
func JobOf(weightsPath string) (string, error) {
	dir := filepath.Dir(weightsPath)
	if !isCheckpointDir(dir, ManifestFile, StateFile) {
		return "", nil
	}
	m, err := ReadManifest(dir)
	if err != nil {
		return "", err
	}
	f, ok := m.file(StateFile)
	if !ok {
		return "", fmt.Errorf("checkpoint: %s: %w: %s is not listed", filepath.Join(dir, ManifestFile), ErrManifest, StateFile)
	}
	b, err := readVerified(dir, f)
	if err != nil {
		return "", err
	}
	st, err := decodeState(filepath.Join(dir, StateFile), b)
	if err != nil {
		return "", err
	}
	return st.Job, nil
}
