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
	dirPrefix  = "step-"
	tmpSuffix  = ".tmp"
	attemptSep = ".attempt-"
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

// parseStepDir returns N and the attempt for a name exactly as AttemptDir
// spells it: step-N (attempt 1) or step-N.attempt-K (K > 1).
func parseStepDir(name string) (step, attempt int, ok bool) {
	base, k, found := strings.Cut(name, attemptSep)
	if step, ok = parseDirName(base); !ok {
		return 0, 0, false
	}
	if !found {
		return step, 1, true
	}
	attempt, err := strconv.Atoi(k)
	if err != nil || attempt < 2 || strconv.Itoa(attempt) != k {
		return 0, 0, false
	}
	return step, attempt, true
}

// parseTmpName returns N for a temporary directory of step N: step-N.tmp
// (Save's) or step-N.tmp-<anything> (SaveFresh's).
func parseTmpName(name string) (int, bool) {
	i := strings.Index(name, tmpSuffix)
	if i < 0 {
		return 0, false
	}
	if rest := name[i+len(tmpSuffix):]; rest != "" && !strings.HasPrefix(rest, "-") {
		return 0, false
	}
	return parseDirName(name[:i])
}

// DirOf checks that dir, a directory a manifest committed elsewhere names
// (etcd's), is a checkpoint directory of step directly under root
// (AttemptDir(root, step, k) for some k), and returns it as a path under
// root. Relative paths are taken from the working directory. A manifest is
// never trusted to point anywhere else.
func DirOf(root, dir string, step int) (string, error) {
	absRoot, err := filepath.Abs(root)
	if err != nil {
		return "", fmt.Errorf("checkpoint: %w", err)
	}
	absDir, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("checkpoint: %w", err)
	}
	base := filepath.Base(absDir)
	if n, _, ok := parseStepDir(base); !ok || n != step || filepath.Dir(absDir) != absRoot {
		return "", fmt.Errorf("checkpoint: %s is not a checkpoint directory of step %d directly under %s", dir, step, root)
	}
	return filepath.Join(root, base), nil
}

// entry is one step-N[.attempt-K] or temporary directory directly under a
// root.
type entry struct {
	step, attempt int
	path          string
}

// scan lists the real directories (never symbolic links) directly under
// root named as AttemptDir names them (done: newest step first, then the
// highest attempt first) and the temporary ones (tmp: newest step first).
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
		if n, k, ok := parseStepDir(name); ok {
			done = append(done, entry{n, k, filepath.Join(root, name)})
		} else if n, ok := parseTmpName(name); ok {
			tmp = append(tmp, entry{n, 0, filepath.Join(root, name)})
		}
	}
	newestFirst := func(es []entry) {
		sort.Slice(es, func(i, j int) bool {
			if es[i].step != es[j].step {
				return es[i].step > es[j].step
			}
			return es[i].attempt > es[j].attempt
		})
	}
	newestFirst(done)
	newestFirst(tmp)
	return done, tmp, nil
}

// List returns the checkpoint directories directly under root (step-N and
// step-N.attempt-K, as AttemptDir names them), newest step first and, of
// one step, the highest attempt (the last written) first, without reading
// them. Unfinished step-N.tmp[-*] directories, set-aside ones and anything
// else are not listed. A root that does not exist holds none.
//
// Attempts exist only in a distributed job's directory, where etcd's
// manifest says which attempt of a step is the committed one; a reader
// without etcd takes the last written.
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

// Prune keeps the checkpoints of the newest keep steps under root and
// removes the older step-N[.attempt-K] directories (keep <= 0 keeps them
// all), with any temporary directory left by a crash that a complete
// checkpoint has overtaken. It returns what it removed. Only directories
// directly under root whose names Save or SaveFresh could have produced
// are ever removed: not files, not symbolic links, not set-aside or
// unrelated directories.
func Prune(root string, keep int) ([]string, error) {
	done, _, err := scan(root)
	if err != nil {
		return nil, err
	}
	cutoff, steps := 0, 0
	for i, e := range done {
		if i > 0 && e.step == done[i-1].step {
			continue
		}
		if steps++; keep > 0 && steps == keep {
			cutoff = e.step
			break
		}
	}
	return RemoveOlder(root, cutoff)
}

// RemoveOlder removes the step-N[.attempt-K] directories under root with N
// < step, and every temporary directory of a step below the newest
// complete checkpoint's (a write that can no longer be committed: a
// crash's leftover; one of the newest step may be a SaveFresh in flight).
// A distributed job calls it with its oldest committed checkpoint's step
// once the older manifests have left etcd. It returns what it removed and
// stops at the first error.
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
			if e.step < done[0].step {
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

// SetAside renames the damaged checkpoint dir (a step-N[.attempt-K]
// directory) to <its name>.damaged-<unix seconds>, where it is kept for inspection but no
// longer listed, so that step can be checkpointed again. It returns the new
// name. A dir already gone (another process set it aside first) is not an
// error: it returns "".
func SetAside(dir string) (string, error) {
	if _, _, ok := parseStepDir(filepath.Base(dir)); !ok {
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
