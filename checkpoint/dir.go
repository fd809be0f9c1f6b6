package checkpoint

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

const (
	dirPrefix = "step-"
	tmpSuffix = ".tmp"
)

// parseDirName returns N for a name exactly as StepDir spells it
// ("step-" and N zero-padded to at least 8 digits).
func parseDirName(name string) (int, bool) {
	digits, ok := strings.CutPrefix(name, dirPrefix)
	if !ok || digits == "" {
		return 0, false
	}
	for _, r := range digits {
		if r < '0' || r > '9' {
			return 0, false
		}
	}
	n, err := strconv.Atoi(digits)
	if err != nil || dirName(n) != name {
		return 0, false
	}
	return n, true
}

// entry is one step-N or step-N.tmp directory directly under a root.
type entry struct {
	step int
	path string
}

// scan lists the real directories (never symbolic links) directly under
// root named step-N (done) and step-N.tmp (tmp), each newest first.
func scan(root string) (done, tmp []entry, err error) {
	ents, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("checkpoint: %w", err)
	}
	for _, e := range ents {
		if !e.IsDir() { // a symlink is not a directory here: never followed
			continue
		}
		name := e.Name()
		if n, ok := parseDirName(name); ok {
			done = append(done, entry{n, filepath.Join(root, name)})
		} else if n, ok := parseDirName(strings.TrimSuffix(name, tmpSuffix)); ok && strings.HasSuffix(name, tmpSuffix) {
			tmp = append(tmp, entry{n, filepath.Join(root, name)})
		}
	}
	newestFirst := func(es []entry) {
		sort.Slice(es, func(i, j int) bool { return es[i].step > es[j].step })
	}
	newestFirst(done)
	newestFirst(tmp)
	return done, tmp, nil
}

// List returns the checkpoint directories directly under root (step-N, as
// StepDir names them), newest first, without reading them. Unfinished
// step-N.tmp directories, set-aside ones and anything else are not listed.
// A root that does not exist holds none.
func List(root string) ([]string, error) {
	done, _, err := scan(root)
	if err != nil {
		return nil, err
	}
	out := make([]string, len(done))
	for i, e := range done {
		out[i] = e.path
	}
	return out, nil
}

// Latest returns the manifest of the newest checkpoint under root that
// verifies (Verify). Each newer one skipped is reported to warn (nil: none).
// Nothing is moved or deleted.
func Latest(root string, warn func(dir string, err error)) (Manifest, error) {
	dirs, err := List(root)
	if err != nil {
		return Manifest{}, err
	}
	for _, d := range dirs {
		m, err := Verify(d)
		if err == nil {
			return m, nil
		}
		if warn != nil {
			warn(d, err)
		}
	}
	return Manifest{}, fmt.Errorf("checkpoint: %w in %s", ErrNoCheckpoint, root)
}

// LoadLatest loads the newest checkpoint under root that loads (Load: it
// verifies every file), falling back to older ones; each one skipped is
// reported to warn (nil: none).
func LoadLatest(root string, warn func(dir string, err error)) (*Checkpoint, error) {
	dirs, err := List(root)
	if err != nil {
		return nil, err
	}
	for _, d := range dirs {
		ck, err := Load(d)
		if err == nil {
			return ck, nil
		}
		if warn != nil {
			warn(d, err)
		}
	}
	return nil, fmt.Errorf("checkpoint: %w in %s", ErrNoCheckpoint, root)
}

// Prune keeps the newest keep checkpoints under root and removes the older
// step-N directories (keep <= 0 keeps them all), with any step-N.tmp left
// by a crash that a complete checkpoint has overtaken. It returns what it
// removed. Only directories directly under root whose names StepDir could
// have produced are ever removed: not files, not symbolic links, not
// set-aside or unrelated directories.
func Prune(root string, keep int) ([]string, error) {
	done, _, err := scan(root)
	if err != nil {
		return nil, err
	}
	cutoff := 0
	if keep > 0 && len(done) > keep {
		cutoff = done[keep-1].step
	}
	return RemoveOlder(root, cutoff)
}

// RemoveOlder removes the step-N directories under root with N < step, and
// every step-N.tmp with N at or below the newest complete checkpoint (a
// write that can no longer complete: a crash's leftover). A distributed
// job calls it with its oldest committed checkpoint's step once the older
// manifests have left etcd. It returns what it removed and stops at the
// first error.
func RemoveOlder(root string, step int) ([]string, error) {
	done, tmp, err := scan(root)
	if err != nil {
		return nil, err
	}
	var gone []entry
	for _, e := range done {
		if e.step < step {
			gone = append(gone, e)
		}
	}
	if len(done) > 0 {
		for _, e := range tmp {
			if e.step <= done[0].step {
				gone = append(gone, e)
			}
		}
	}
	var removed []string
	for _, e := range gone {
		if err := os.RemoveAll(e.path); err != nil {
			return removed, fmt.Errorf("checkpoint: prune %s: %w", e.path, err)
		}
		removed = append(removed, e.path)
	}
	return removed, nil
}

// SetAside renames the damaged checkpoint dir (a step-N directory) to
// step-N.damaged-<unix seconds>, where it is kept for inspection but no
// longer listed, so that step can be checkpointed again. It returns the new
// name. A dir already gone (another process set it aside first) is not an
// error: it returns "".
func SetAside(dir string) (string, error) {
	if _, ok := parseDirName(filepath.Base(dir)); !ok {
		return "", fmt.Errorf("checkpoint: set aside %s: not a checkpoint directory", dir)
	}
	aside := fmt.Sprintf("%s.damaged-%d", dir, time.Now().Unix())
	if err := os.Rename(dir, aside); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return "", nil
		}
		return "", fmt.Errorf("checkpoint: set aside %s: %w", dir, err)
	}
	return aside, nil
}
