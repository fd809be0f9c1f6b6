package checkpoint

import (
	"encoding/json"
	"errors"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/bmojo/bmojo/internal/safetensors"
	"github.com/bmojo/bmojo/model"
)

// sample builds a checkpoint of preset at data step step with seeded random
// float32 tensors, including values a float64 detour could disturb
// (subnormals, NaN payloads are not needed: bits must just survive).
func sample(t *testing.T, preset string, step int) Checkpoint {
	t.Helper()
	c, err := model.Preset(preset)
	if err != nil {
		t.Fatal(err)
	}
	n := model.NewLayout(c).Total
	rng := rand.New(rand.NewPCG(uint64(step), 7))
	vec := func() []float32 {
		v := make([]float32, n)
		for i := range v {
			v[i] = math.Float32frombits(rng.Uint32() &^ (0xff << 23)) // finite: exponent bits cleared, subnormals included
			if i%3 == 0 {
				v[i] = float32(rng.NormFloat64())
			}
		}
		return v
	}
	return Checkpoint{Config: c, Params: vec(), M: vec(), V: vec(), State: State{
		DataStep: step, OptimizerStep: step - 1, Seed: 3, BatchSize: 4, SeqLen: c.SeqLen, Skipped: 1,
		Losses: []float64{5.5, 5.25}, ValLoss: 4.75,
	}}
}

func sameBits(a, b []float32) bool {
	return slices.EqualFunc(a, b, func(x, y float32) bool { return math.Float32bits(x) == math.Float32bits(y) })
}

func save(t *testing.T, root string, ck Checkpoint) Manifest {
	t.Helper()
	m, err := Save(root, ck)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestRoundTripIsBitwise(t *testing.T) {
	for _, preset := range []string{"bmojo-tiny", "mamba-tiny", "hybrid-tiny", "swa-tiny"} {
		t.Run(preset, func(t *testing.T) {
			root := t.TempDir()
			want := sample(t, preset, 12)
			m := save(t, root, want)
			if m.Dir != StepDir(root, 12) || filepath.Base(m.Dir) != "step-00000012" || len(m.Files) != 3 {
				t.Fatalf("manifest %+v", m)
			}
			got, err := Load(m.Dir)
			if err != nil {
				t.Fatal(err)
			}
			if !sameBits(got.Params, want.Params) || !sameBits(got.M, want.M) || !sameBits(got.V, want.V) {
				t.Fatal("tensors changed on the way through the files")
			}
			if model.ConfigMetadata(got.Config)[model.ConfigKey] != m.Config {
				t.Fatalf("config %v, manifest %s", got.Config, m.Config)
			}
			st := want.State
			st.Version = StateVersion
			if !reflectEqual(got.State, st) {
				t.Fatalf("state %+v, want %+v", got.State, st)
			}
			// The manifest on disk is the one Save returned (what a worker
			// commits to etcd), and it verifies.
			v, err := Verify(m.Dir)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(v.Files, m.Files) || v.Step != 12 || v.Config != m.Config {
				t.Fatalf("manifest on disk %+v, Save returned %+v", v, m)
			}
			// docs/model.md §7 names and shapes, PyTorch layout.
			f, err := safetensors.Read(filepath.Join(m.Dir, WeightsFile))
			if err != nil {
				t.Fatal(err)
			}
			c := want.Config
			shape := map[string][]int{"embed.weight": {c.VocabSize, c.DModel}, "norm_f.weight": {c.DModel}}
			if c.Mixers[0] != model.MixerAttention {
				shape["layers.0.ssm.in_proj.weight"] = []int{2 * c.DInner, c.DModel}
				shape["layers.0.ssm.A_log"] = []int{c.DInner, c.DState}
			}
			for name, s := range shape {
				if got := f.Tensors[name].Shape; !slices.Equal(got, s) {
					t.Fatalf("%s: shape %v, want %v", name, got, s)
				}
			}
			w, err := LoadWeights(root, nil)
			if err != nil || !sameBits(w.Params, want.Params) || w.Path != filepath.Join(m.Dir, WeightsFile) {
				t.Fatalf("LoadWeights(root): %v, path %q", err, w.Path)
			}
		})
	}
}

func reflectEqual(a, b State) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return string(x) == string(y)
}

// TestFlippedBitIsRefusedNamingTheFile: one flipped bit in any file of a
// checkpoint fails Verify, Load and LoadWeights with an error naming it.
func TestFlippedBitIsRefusedNamingTheFile(t *testing.T) {
	for _, name := range []string{WeightsFile, OptimFile, StateFile} {
		t.Run(name, func(t *testing.T) {
			root := t.TempDir()
			m := save(t, root, sample(t, "bmojo-tiny", 3))
			path := filepath.Join(m.Dir, name)
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			b[len(b)/2] ^= 0x10
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}
			check := func(what string, err error) {
				t.Helper()
				if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), path) {
					t.Fatalf("%s: got %v, want ErrDamaged naming %s", what, err, path)
				}
			}
			_, err = Verify(m.Dir)
			check("Verify", err)
			_, err = Load(m.Dir)
			check("Load", err)
			_, err = LoadWith(m.Dir, m)
			check("LoadWith", err)
			if name == WeightsFile {
				for _, arg := range []string{m.Dir, path} {
					_, err = LoadWeights(arg, nil)
					check("LoadWeights "+arg, err)
				}
			}
		})
	}
}

func TestTruncatedFileIsRefused(t *testing.T) {
	root := t.TempDir()
	m := save(t, root, sample(t, "bmojo-tiny", 3))
	path := filepath.Join(m.Dir, OptimFile)
	b, _ := os.ReadFile(path)
	if err := os.WriteFile(path, b[:len(b)-7], 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Load(m.Dir)
	if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "bytes") {
		t.Fatalf("got %v, want ErrDamaged naming %s and its size", err, path)
	}
}

func TestManifestProblemsAreRefused(t *testing.T) {
	edit := func(t *testing.T, dir string, f func(m map[string]any)) {
		t.Helper()
		path := filepath.Join(dir, ManifestFile)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		f(m)
		b, _ = json.Marshal(m)
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		name   string
		damage func(t *testing.T, dir string)
		want   string
	}{
		{"missing", func(t *testing.T, dir string) { os.Remove(filepath.Join(dir, ManifestFile)) }, "no manifest.json"},
		{"no files", func(t *testing.T, dir string) { edit(t, dir, func(m map[string]any) { m["files"] = []any{} }) }, "lists no files"},
		{"files null", func(t *testing.T, dir string) { edit(t, dir, func(m map[string]any) { delete(m, "files") }) }, "lists no files"},
		{"outside the directory", func(t *testing.T, dir string) {
			edit(t, dir, func(m map[string]any) {
				fs := m["files"].([]any)
				fs[0].(map[string]any)["name"] = "../elsewhere/model.safetensors"
			})
		}, "not a plain name"},
		{"a file left out", func(t *testing.T, dir string) {
			edit(t, dir, func(m map[string]any) { m["files"] = m["files"].([]any)[1:] })
		}, "model.safetensors is not listed"},
		{"another step", func(t *testing.T, dir string) { edit(t, dir, func(m map[string]any) { m["step"] = 4 }) }, "named for step 3"},
		{"another version", func(t *testing.T, dir string) { edit(t, dir, func(m map[string]any) { m["version"] = 9 }) }, "version 9"},
		{"not json", func(t *testing.T, dir string) { os.WriteFile(filepath.Join(dir, ManifestFile), []byte("{"), 0o644) }, "manifest.json"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			m := save(t, root, sample(t, "bmojo-tiny", 3))
			tc.damage(t, m.Dir)
			for what, f := range map[string]func() error{
				"Verify":      func() error { _, err := Verify(m.Dir); return err },
				"Load":        func() error { _, err := Load(m.Dir); return err },
				"LoadWeights": func() error { _, err := LoadWeights(m.Dir, nil); return err },
			} {
				err := f()
				if !errors.Is(err, ErrManifest) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), m.Dir) {
					t.Fatalf("%s: got %v, want ErrManifest naming the directory and %q", what, err, tc.want)
				}
			}
		})
	}
	t.Run("LoadWith no files", func(t *testing.T) {
		root := t.TempDir()
		m := save(t, root, sample(t, "bmojo-tiny", 3))
		m.Files = nil
		if _, err := LoadWith(m.Dir, m); !errors.Is(err, ErrManifest) {
			t.Fatalf("got %v, want ErrManifest", err)
		}
	})
}

// TestLoadWithCommittedManifest: the distributed path verifies against the
// manifest it committed to etcd, which also covers checkpoints written
// before manifest.json existed; a file that differs from it is refused.
func TestLoadWithCommittedManifest(t *testing.T) {
	root := t.TempDir()
	want := sample(t, "bmojo-tiny", 3)
	m := save(t, root, want)
	if err := os.Remove(filepath.Join(m.Dir, ManifestFile)); err != nil {
		t.Fatal(err)
	}
	got, err := LoadWith(m.Dir, Manifest{Step: m.Step, Files: m.Files, Config: m.Config, Dir: "/ignored"})
	if err != nil || !sameBits(got.Params, want.Params) {
		t.Fatalf("LoadWith: %v", err)
	}
	bad := slices.Clone(m.Files)
	bad[1].SHA256 = strings.Repeat("0", 64)
	_, err = LoadWith(m.Dir, Manifest{Step: m.Step, Files: bad})
	if !errors.Is(err, ErrDamaged) || !strings.Contains(err.Error(), filepath.Join(m.Dir, bad[1].Name)) {
		t.Fatalf("got %v, want ErrDamaged naming %s", err, bad[1].Name)
	}
}

// TestStateVersion1Migrates: trainer.json of version 1 ("step" = data step,
// the optimizer step implied as step - skipped) still loads.
func TestStateVersion1Migrates(t *testing.T) {
	v1 := []byte(`{"version":1,"step":9,"seed":3,"batch_size":4,"seq_len":128,"skipped_steps":2,"train_losses":[1,2]}`)
	st, err := decodeState("trainer.json", v1)
	if err != nil {
		t.Fatal(err)
	}
	if st.DataStep != 9 || st.OptimizerStep != 7 || st.Skipped != 2 || st.Version != StateVersion || len(st.Losses) != 2 {
		t.Fatalf("migrated %+v", st)
	}
	for _, bad := range []string{`{"version":3,"data_step":1}`, `{"version":1}`, `{"version":2,"data_step":2,"optimizer_step":3}`} {
		if _, err := decodeState("trainer.json", []byte(bad)); !errors.Is(err, ErrContent) {
			t.Fatalf("%s: got %v, want ErrContent", bad, err)
		}
	}
}

// TestPruneRemovesOnlyOldCheckpoints: Prune keeps the newest N step-N
// directories and touches nothing else under the root, whatever names or
// links it finds there, and nothing outside it.
func TestPruneRemovesOnlyOldCheckpoints(t *testing.T) {
	base := t.TempDir()
	root := filepath.Join(base, "ckpt")
	elsewhere := filepath.Join(base, "elsewhere")
	if err := os.MkdirAll(elsewhere, 0o755); err != nil {
		t.Fatal(err)
	}
	precious := filepath.Join(elsewhere, "precious")
	if err := os.WriteFile(precious, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, step := range []int{2, 4, 6, 8} {
		save(t, root, sample(t, "bmojo-tiny", step))
	}
	// A manifest naming ../elsewhere, stray directories, a link to
	// elsewhere with a checkpoint's name, a set-aside checkpoint, files.
	hostile := StepDir(root, 2)
	b, _ := os.ReadFile(filepath.Join(hostile, ManifestFile))
	b = []byte(strings.Replace(string(b), `"name": "trainer.json"`, `"name": "../elsewhere"`, 1))
	os.WriteFile(filepath.Join(hostile, ManifestFile), b, 0o644)
	strays := []string{"elsewhere", "step-1", "step-0000000x", "etcd", "step-00000001.damaged-5", "notes.txt"}
	for _, s := range strays[:5] {
		os.MkdirAll(filepath.Join(root, s), 0o755)
	}
	os.WriteFile(filepath.Join(root, strays[5]), nil, 0o644)
	if err := os.Symlink(elsewhere, filepath.Join(root, "step-00000000")); err != nil {
		t.Fatal(err)
	}
	removed, err := Prune(root, 2)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{StepDir(root, 4), StepDir(root, 2)}; !slices.Equal(removed, want) {
		t.Fatalf("removed %v, want %v", removed, want)
	}
	left, _ := List(root)
	if want := []string{StepDir(root, 8), StepDir(root, 6)}; !slices.Equal(left, want) {
		t.Fatalf("left %v, want %v", left, want)
	}
	for _, p := range append([]string{precious, filepath.Join(root, "step-00000000")}, func() []string {
		var out []string
		for _, s := range strays {
			out = append(out, filepath.Join(root, s))
		}
		return out
	}()...) {
		if _, err := os.Lstat(p); err != nil {
			t.Fatalf("%s is gone: %v", p, err)
		}
	}
	// keep 0 keeps everything.
	if removed, err := Prune(root, 0); err != nil || len(removed) != 0 {
		t.Fatalf("Prune(0) removed %v (%v)", removed, err)
	}
}

// TestLatestSkipsDamagedNewest: the newest checkpoint fails verification,
// Latest and LoadLatest fall back to the previous one and warn once,
// naming it.
func TestLatestSkipsDamagedNewest(t *testing.T) {
	root := t.TempDir()
	save(t, root, sample(t, "bmojo-tiny", 3))
	newest := save(t, root, sample(t, "bmojo-tiny", 6))
	path := filepath.Join(newest.Dir, WeightsFile)
	b, _ := os.ReadFile(path)
	b[100] ^= 1
	os.WriteFile(path, b, 0o644)
	var warned []string
	warn := func(dir string, err error) { warned = append(warned, dir+": "+err.Error()) }
	m, err := Latest(root, warn)
	if err != nil || m.Step != 3 {
		t.Fatalf("Latest: step %d, %v; want step 3", m.Step, err)
	}
	ck, err := LoadLatest(root, warn)
	if err != nil || ck.State.DataStep != 3 {
		t.Fatalf("LoadLatest: %v", err)
	}
	if len(warned) != 2 || !strings.Contains(warned[0], path) || !strings.Contains(warned[1], path) {
		t.Fatalf("warnings %q; want one per call naming %s", warned, path)
	}
	// Set aside, the damaged one is no longer listed, and its step can be
	// written again.
	aside, err := SetAside(newest.Dir)
	if err != nil || !strings.HasPrefix(filepath.Base(aside), "step-00000006.damaged-") {
		t.Fatalf("SetAside: %q, %v", aside, err)
	}
	if dirs, _ := List(root); len(dirs) != 1 {
		t.Fatalf("listed %v after setting step 6 aside", dirs)
	}
	save(t, root, sample(t, "bmojo-tiny", 6))
	if _, err := Latest(t.TempDir(), nil); !errors.Is(err, ErrNoCheckpoint) {
		t.Fatalf("empty root: %v, want ErrNoCheckpoint", err)
	}
}

// TestCrashLeftoversAreIgnoredAndCleaned: a step-N.tmp or step-N.tmp-* (a
// save cut short) is never listed or loaded; a later save of that step
// replaces step-N.tmp, and Prune removes the ones a complete checkpoint has
// overtaken.
func TestCrashLeftoversAreIgnoredAndCleaned(t *testing.T) {
	root := t.TempDir()
	save(t, root, sample(t, "bmojo-tiny", 3))
	// A crash mid-save of step 6 and one of step 9 (SaveFresh's name):
	// half-written files.
	for _, s := range []int{6, 9} {
		tmp := StepDir(root, s) + ".tmp"
		if s == 9 {
			tmp += "-123456"
		}
		os.MkdirAll(tmp, 0o755)
		os.WriteFile(filepath.Join(tmp, WeightsFile), []byte("partial"), 0o644)
	}
	if dirs, _ := List(root); len(dirs) != 1 {
		t.Fatalf("listed %v, want only step 3", dirs)
	}
	if m, err := Latest(root, func(dir string, err error) { t.Errorf("warned about %s: %v", dir, err) }); err != nil || m.Step != 3 {
		t.Fatalf("Latest: %+v, %v", m, err)
	}
	save(t, root, sample(t, "bmojo-tiny", 6)) // replaces step-6.tmp
	if _, err := os.Stat(StepDir(root, 6) + ".tmp"); !os.IsNotExist(err) {
		t.Fatalf("step-6.tmp still there after step 6 was saved: %v", err)
	}
	if _, err := Load(StepDir(root, 6)); err != nil {
		t.Fatal(err)
	}
	save(t, root, sample(t, "bmojo-tiny", 12))
	removed, err := Prune(root, 0)
	if err != nil || !slices.Equal(removed, []string{StepDir(root, 9) + ".tmp-123456"}) {
		t.Fatalf("Prune removed %v (%v), want only the overtaken step-9.tmp-123456", removed, err)
	}
}

func TestSaveRefusesToOverwrite(t *testing.T) {
	root := t.TempDir()
	m := save(t, root, sample(t, "bmojo-tiny", 3))
	before, _ := os.ReadFile(filepath.Join(m.Dir, WeightsFile))
	_, err := Save(root, sample(t, "bmojo-tiny", 3))
	if !errors.Is(err, ErrExists) {
		t.Fatalf("got %v, want ErrExists", err)
	}
	after, _ := os.ReadFile(filepath.Join(m.Dir, WeightsFile))
	if string(before) != string(after) {
		t.Fatal("the existing checkpoint changed")
	}
	bad := sample(t, "bmojo-tiny", 4)
	bad.M = bad.M[1:]
	if _, err := Save(root, bad); err == nil || !strings.Contains(err.Error(), "first moments") {
		t.Fatalf("short moments: %v", err)
	}
	if _, err := os.Stat(StepDir(root, 4) + ".tmp"); !os.IsNotExist(err) {
		t.Fatal("a refused save left a temporary directory")
	}
}

// TestWeightsMismatchNamesTheTensor: weights that verify but do not fit
// their config are refused naming the file and the tensor.
func TestWeightsMismatchNamesTheTensor(t *testing.T) {
	c, _ := model.Preset("bmojo-tiny")
	l := model.NewLayout(c)
	p := sample(t, "bmojo-tiny", 1).Params
	dir := t.TempDir()
	good := tensors(l, p, "")
	cases := []struct {
		name string
		edit func([]safetensors.Tensor) ([]safetensors.Tensor, map[string]string)
		want string
	}{
		{"missing tensor", func(ts []safetensors.Tensor) ([]safetensors.Tensor, map[string]string) {
			return ts[1:], model.ConfigMetadata(c)
		}, "embed.weight"},
		{"wrong shape", func(ts []safetensors.Tensor) ([]safetensors.Tensor, map[string]string) {
			out := slices.Clone(ts)
			out[0] = safetensors.Tensor{Name: "embed.weight", Shape: []int{128, 128}, Data: ts[0].Data}
			return out, model.ConfigMetadata(c)
		}, "embed.weight"},
		{"extra tensor", func(ts []safetensors.Tensor) ([]safetensors.Tensor, map[string]string) {
			return append(slices.Clone(ts), safetensors.Tensor{Name: "layers.9.norm1.weight", Shape: []int{64}, Data: make([]float32, 64)}), model.ConfigMetadata(c)
		}, "layers.9.norm1.weight"},
		{"no config", func(ts []safetensors.Tensor) ([]safetensors.Tensor, map[string]string) { return ts, nil }, "config"},
		{"invalid config", func(ts []safetensors.Tensor) ([]safetensors.Tensor, map[string]string) {
			bad := c
			bad.Window = 100000
			return ts, model.ConfigMetadata(bad)
		}, "window"},
		{"hostile config", func(ts []safetensors.Tensor) ([]safetensors.Tensor, map[string]string) {
			bad := c
			bad.VocabSize = 1 << 40
			return ts, model.ConfigMetadata(bad)
		}, "vocab_size must be at most"},
		{"config unlike the tensors", func(ts []safetensors.Tensor) ([]safetensors.Tensor, map[string]string) {
			bad := c
			bad.VocabSize *= 2
			return ts, model.ConfigMetadata(bad)
		}, "embed.weight"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ts, meta := tc.edit(good)
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_")+".safetensors")
			if err := safetensors.Write(path, ts, meta); err != nil {
				t.Fatal(err)
			}
			_, err := LoadWeights(path, nil) // an export: no manifest beside it
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), path) {
				t.Fatalf("got %v, want an error naming %q and the file", err, tc.want)
			}
		})
	}
	t.Run("export loads", func(t *testing.T) {
		path := filepath.Join(dir, "export.safetensors")
		if err := safetensors.Write(path, good, model.ConfigMetadata(c)); err != nil {
			t.Fatal(err)
		}
		w, err := LoadWeights(path, nil)
		if err != nil || !sameBits(w.Params, p) {
			t.Fatalf("export: %v", err)
		}
	})
	t.Run("inside a checkpoint without its manifest", func(t *testing.T) {
		root := t.TempDir()
		m := save(t, root, sample(t, "bmojo-tiny", 1))
		os.Remove(filepath.Join(m.Dir, ManifestFile))
		if _, err := LoadWeights(filepath.Join(m.Dir, WeightsFile), nil); !errors.Is(err, ErrManifest) {
			t.Fatalf("got %v, want ErrManifest", err)
		}
	})
}

// TestPreManifestCheckpointsMigrate: a checkpoint as bmojo wrote it before
// manifests (no manifest.json, trainer.json version 1) gets its manifest on
// first read and loads with its state migrated; from then on it is
// verified. One with a version 2 trainer.json has lost its manifest and is
// refused.
func TestPreManifestCheckpointsMigrate(t *testing.T) {
	root := t.TempDir()
	want := sample(t, "bmojo-tiny", 7)
	old := save(t, root, want)
	lost := save(t, root, sample(t, "bmojo-tiny", 9))
	for _, d := range []string{old.Dir, lost.Dir} {
		os.Remove(filepath.Join(d, ManifestFile))
	}
	v1 := `{"version":1,"step":7,"seed":3,"batch_size":4,"seq_len":128,"skipped_steps":1,"train_losses":[5.5,5.25],"val_loss":4.75}`
	if err := os.WriteFile(filepath.Join(old.Dir, StateFile), []byte(v1), 0o644); err != nil {
		t.Fatal(err)
	}
	var warned []string
	ck, err := LoadLatest(root, func(dir string, err error) { warned = append(warned, dir) })
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(warned, []string{lost.Dir}) {
		t.Fatalf("warned about %v, want only %s (version 2 without its manifest)", warned, lost.Dir)
	}
	if ck.Dir != old.Dir || !sameBits(ck.Params, want.Params) || ck.State.DataStep != 7 || ck.State.OptimizerStep != 6 || ck.State.Version != StateVersion {
		t.Fatalf("migrated checkpoint %s loads as state %+v", ck.Dir, ck.State)
	}
	m, err := Verify(old.Dir)
	if err != nil || m.Config == "" || len(m.Files) != 3 {
		t.Fatalf("manifest written on migration: %+v, %v", m, err)
	}
	// Sealed, it is verified like any other.
	path := filepath.Join(old.Dir, OptimFile)
	b, _ := os.ReadFile(path)
	b[len(b)-1] ^= 1
	os.WriteFile(path, b, 0o644)
	if _, err := Load(old.Dir); !errors.Is(err, ErrDamaged) {
		t.Fatalf("after migration a flipped bit: %v, want ErrDamaged", err)
	}
}

// TestSaveFreshNeverTouchesExisting: a writer that finds step-N written
// (a superseded rank 0's, which it must not trust or touch) gets a
// directory of its own, the next free attempt; every directory keeps its
// bytes, List shows the last written attempt of a step first, and Prune
// counts steps, not attempts.
func TestSaveFreshNeverTouchesExisting(t *testing.T) {
	root := t.TempDir()
	first := save(t, root, sample(t, "bmojo-tiny", 3))
	mine := sample(t, "bmojo-tiny", 3)
	mine.Params[0]++ // other bytes than the one already there
	var dirs []string
	for attempt := 2; attempt <= 3; attempt++ {
		m, err := SaveFresh(root, mine)
		if err != nil {
			t.Fatal(err)
		}
		if want := AttemptDir(root, 3, attempt); m.Dir != want {
			t.Fatalf("SaveFresh wrote %s, want %s", m.Dir, want)
		}
		ck, err := LoadWith(m.Dir, m) // the manifest to commit describes what it wrote
		if err != nil || !sameBits(ck.Params, mine.Params) {
			t.Fatalf("%s: %v", m.Dir, err)
		}
		dirs = append([]string{m.Dir}, dirs...)
	}
	if got, err := Verify(first.Dir); err != nil || got.Files[0].SHA256 != first.Files[0].SHA256 {
		t.Fatalf("the existing %s changed: %v", first.Dir, err)
	}
	if left, _ := List(root); !slices.Equal(left, append(dirs, first.Dir)) {
		t.Fatalf("List: %v, want %v", left, append(dirs, first.Dir))
	}
	if ents, _ := os.ReadDir(root); len(ents) != 3 {
		t.Fatalf("root holds %d entries, want the 3 checkpoints (a temporary directory left?)", len(ents))
	}
	// A free step takes the plain name.
	five, err := SaveFresh(root, sample(t, "bmojo-tiny", 5))
	if err != nil || five.Dir != StepDir(root, 5) {
		t.Fatalf("SaveFresh of a new step: %s, %v", five.Dir, err)
	}
	if m, err := Latest(root, nil); err != nil || m.Dir != five.Dir {
		t.Fatalf("Latest: %s, %v", m.Dir, err)
	}
	removed, err := Prune(root, 2)
	if err != nil || len(removed) != 0 {
		t.Fatalf("Prune(2) of two steps removed %v (%v)", removed, err)
	}
	save(t, root, sample(t, "bmojo-tiny", 7))
	removed, err = Prune(root, 2)
	if want := append(dirs, first.Dir); err != nil || !slices.Equal(removed, want) {
		t.Fatalf("Prune(2) removed %v (%v), want every attempt of step 3: %v", removed, err, want)
	}
}

// TestSaveFreshConcurrentWriters: two writers of one step at once (a stale
// rank 0 and the new one) never share a temporary directory or a final
// one: both land whole, each directory holds exactly its writer's bytes.
func TestSaveFreshConcurrentWriters(t *testing.T) {
	root := t.TempDir()
	cks := []Checkpoint{sample(t, "bmojo-tiny", 4), sample(t, "bmojo-tiny", 4)}
	cks[1].Params[1]++
	mans := make([]Manifest, len(cks))
	errs := make([]error, len(cks))
	done := make(chan int)
	for i := range cks {
		go func() { mans[i], errs[i] = SaveFresh(root, cks[i]); done <- i }()
	}
	for range cks {
		<-done
	}
	if errs[0] != nil || errs[1] != nil || mans[0].Dir == mans[1].Dir {
		t.Fatalf("SaveFresh: %s (%v), %s (%v)", mans[0].Dir, errs[0], mans[1].Dir, errs[1])
	}
	for i, m := range mans {
		ck, err := Load(m.Dir)
		if err != nil || !sameBits(ck.Params, cks[i].Params) {
			t.Fatalf("writer %d's %s: %v (or another writer's bytes)", i, m.Dir, err)
		}
	}
}

// TestDirOf: a manifest kept in etcd may only name a directory of its own
// step directly under the checkpoint root.
func TestDirOf(t *testing.T) {
	root := t.TempDir()
	for _, c := range []struct {
		name, dir string
		step      int
		ok        bool
	}{
		{"step-N", StepDir(root, 6), 6, true},
		{"attempt", AttemptDir(root, 6, 3), 6, true},
		{"unclean but inside", root + "/x/../" + dirName(6), 6, true},
		{"another step", StepDir(root, 7), 6, false},
		{"attempt of another step", AttemptDir(root, 7, 2), 6, false},
		{"attempt 1 spelled out", StepDir(root, 6) + ".attempt-1", 6, false},
		{"zero-padded attempt", StepDir(root, 6) + ".attempt-02", 6, false},
		{"set aside", StepDir(root, 6) + ".damaged-5", 6, false},
		{"temporary", StepDir(root, 6) + ".tmp-123", 6, false},
		{"outside the root", filepath.Join(root, "..", dirName(6)), 6, false},
		{"nested", filepath.Join(root, "sub", dirName(6)), 6, false},
		{"the root", root, 6, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := DirOf(root, c.dir, c.step)
			if (err == nil) != c.ok {
				t.Fatalf("DirOf(%s, step %d) = %q, %v; want ok %v", c.dir, c.step, got, err, c.ok)
			}
			if c.ok && filepath.Dir(got) != root {
				t.Fatalf("DirOf = %s, not directly under %s", got, root)
			}
		})
	}
}
