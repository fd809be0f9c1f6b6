package checkpoint

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/bmojo/bmojo/internal/fsutil"
	"github.com/bmojo/bmojo/model"
)

// Checkpoints written before this package existed have no manifest.json
// and a version 1 trainer.json. A distributed job's still verify against
// the manifests etcd holds for them (LoadWith). Read any other way, such a
// checkpoint has nothing to be verified against: ReadManifest seals it once
// (seal), so that it keeps resuming and loading, verified from then on.

// seal writes the manifest of a checkpoint written before checkpoints
// carried one: dir must be a step-N directory with no manifest.json and a
// version 1 trainer.json, and its files must load and fit together. The
// manifest records the files as they are now. Anything else is refused and
// nothing is written: a checkpoint whose trainer.json is version 2 was
// written with a manifest, so a missing one is damage.
func seal(dir string) (Manifest, error) {
	step, ok := parseDirName(filepath.Base(filepath.Clean(dir)))
	if !ok {
		return Manifest{}, fmt.Errorf("checkpoint: seal %s: not a step-N checkpoint directory", dir)
	}
	if _, err := os.Lstat(filepath.Join(dir, ManifestFile)); !errors.Is(err, os.ErrNotExist) {
		return Manifest{}, fmt.Errorf("checkpoint: seal %s: it has a %s already (or it cannot be read: %v)", dir, ManifestFile, err)
	}
	m := Manifest{Format: ManifestFormat, Version: ManifestVersion, Step: step, Dir: dir}
	for _, name := range []string{WeightsFile, OptimFile, StateFile} {
		d, err := fsutil.HashFile(filepath.Join(dir, name))
		if err != nil {
			return Manifest{}, fmt.Errorf("checkpoint: seal %s: %w", dir, err)
		}
		m.Files = append(m.Files, File{Name: name, Size: d.Size, SHA256: d.SHA256})
	}
	ck, err := load(dir, m) // against the hashes just taken: the files fit together as hashed
	if err != nil {
		return Manifest{}, fmt.Errorf("%w (while adding the manifest an older bmojo did not write)", err)
	}
	m.Config = model.ConfigMetadata(ck.Config)[model.ConfigKey]
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return Manifest{}, fmt.Errorf("checkpoint: seal %s: %w", dir, err)
	}
	if _, err := fsutil.WriteBytes(filepath.Join(dir, ManifestFile), append(b, '\n')); err != nil {
		return Manifest{}, fmt.Errorf("checkpoint: seal %s: %w", dir, err)
	}
	return m, nil
}

// isLegacy: dir's trainer.json says version 1.
func isLegacy(dir string) bool {
	b, err := readBounded(filepath.Join(dir, StateFile))
	if err != nil {
		return false
	}
	var v struct {
		Version int `json:"version"`
	}
	return json.Unmarshal(b, &v) == nil && v.Version == 1
}
