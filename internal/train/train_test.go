package train

import (
	"context"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/bmojo/bmojo/model"
)

func tinyJob(t *testing.T) Job {
	t.Helper()
	j := Default()
	j.Preset = "bmojo-tiny"
	mc, err := model.Preset(j.Preset)
	if err != nil {
		t.Fatal(err)
	}
	j.Model = mc
	j.Steps, j.BatchSize = 6, 2
	j.EvalEvery, j.EvalBatches = 3, 1
	j.CheckpointEvery, j.KeepCheckpoints = 3, 0
	j.CheckpointDir = t.TempDir()
	return j
}

func run(t *testing.T, j Job, resume bool) (Result, *captureLog) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cl := &captureLog{}
	res, err := Run(ctx, j, Options{Logger: hclog.New(&hclog.LoggerOptions{Output: cl, Level: hclog.Debug}), Resume: resume})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	return res, cl
}

type captureLog struct{ strings.Builder }

func (c *captureLog) Write(p []byte) (int, error) { return c.Builder.Write(p) }

func sameBits(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if math.Float64bits(a[i]) != math.Float64bits(b[i]) {
			return false
		}
	}
	return true
}

// TestResumeIsBitwiseIdentical: a run stopped after a checkpoint and resumed
// follows exactly the loss curve of an uninterrupted run (system.md: "on the
// CPU backend the resumed loss curve equals an uninterrupted run's").
func TestResumeIsBitwiseIdentical(t *testing.T) {
	full := tinyJob(t)
	want, _ := run(t, full, false)
	if len(want.Losses) != 6 || !(want.Losses[5] < want.Losses[0]) {
		t.Fatalf("uninterrupted losses %v: want 6 falling", want.Losses)
	}

	// Interrupt after step 3: the step-6 checkpoint never happened.
	part := full
	if err := os.RemoveAll(filepath.Join(part.CheckpointDir, "step-00000006")); err != nil {
		t.Fatal(err)
	}
	got, logs := run(t, part, true)
	if !strings.Contains(logs.String(), "resumed") {
		t.Fatalf("second run did not resume:\n%s", logs.String())
	}
	if !sameBits(got.Losses, want.Losses) {
		t.Fatalf("resumed losses differ:\n got  %v\n want %v", got.Losses, want.Losses)
	}
	if math.Float64bits(got.ValLoss) != math.Float64bits(want.ValLoss) {
		t.Fatalf("final val loss %v, uninterrupted %v", got.ValLoss, want.ValLoss)
	}
}

func TestCorruptCheckpointFallsBackToPrevious(t *testing.T) {
	j := tinyJob(t)
	j.Steps = 6
	first, _ := run(t, j, false)
	// Flip a byte in the newest checkpoint's weights.
	newest := filepath.Join(j.CheckpointDir, "step-00000006", WeightsFile)
	b, err := os.ReadFile(newest)
	if err != nil {
		t.Fatal(err)
	}
	b = b[:len(b)-7] // truncated, as by a crash or a full disk
	if err := os.WriteFile(newest, b, 0o644); err != nil {
		t.Fatal(err)
	}
	var warned []string
	ck, err := LatestCheckpoint(j.CheckpointDir, func(dir string, err error) { warned = append(warned, dir+": "+err.Error()) })
	if err != nil {
		t.Fatal(err)
	}
	if ck.State.Step != 3 || len(warned) != 1 || !strings.Contains(warned[0], "step-00000006") {
		t.Fatalf("loaded step %d, warnings %q; want step 3 and one warning naming step-00000006", ck.State.Step, warned)
	}
	// Resuming a longer job redoes steps 4..6 from step 3 identically.
	j.Steps = 6
	if err := os.RemoveAll(filepath.Join(j.CheckpointDir, "step-00000006")); err != nil {
		t.Fatal(err)
	}
	again, _ := run(t, j, true)
	if !sameBits(again.Losses, first.Losses) {
		t.Fatalf("losses after fallback %v, first run %v", again.Losses, first.Losses)
	}
}

func TestRefusesToOverwriteCheckpoints(t *testing.T) {
	j := tinyJob(t)
	j.Steps = 3
	run(t, j, false)
	before, err := os.ReadFile(filepath.Join(j.CheckpointDir, "step-00000003", WeightsFile))
	if err != nil {
		t.Fatal(err)
	}
	_, err = Run(context.Background(), j, Options{})
	if err == nil || !strings.Contains(err.Error(), "--resume") {
		t.Fatalf("second fresh run into the same dir: %v; want an error suggesting --resume", err)
	}
	after, _ := os.ReadFile(filepath.Join(j.CheckpointDir, "step-00000003", WeightsFile))
	if string(before) != string(after) {
		t.Fatal("existing checkpoint changed")
	}
}

func TestResumeRejectsDifferentJob(t *testing.T) {
	j := tinyJob(t)
	j.Steps = 3
	run(t, j, false)
	cases := []struct {
		name  string
		tweak func(*Job)
		want  string
	}{
		{"model", func(j *Job) { j.Model.DFF = 64 }, "different model config"},
		{"batch", func(j *Job) { j.BatchSize = 3 }, "batch_size"},
		{"seed", func(j *Job) { j.Seed = 9 }, "seed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			k := j
			k.Steps = 6
			tc.tweak(&k)
			_, err := Run(context.Background(), k, Options{Resume: true})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error mentioning %q", err, tc.want)
			}
		})
	}
}

func TestUnwritableCheckpointDir(t *testing.T) {
	if os.Geteuid() == 0 {
		// root writes anywhere: use a path under a regular file instead.
		dir := filepath.Join(t.TempDir(), "file")
		if err := os.WriteFile(dir, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		j := tinyJob(t)
		j.CheckpointDir = filepath.Join(dir, "ck")
		_, err := Run(context.Background(), j, Options{})
		if err == nil || !strings.Contains(err.Error(), "checkpoint dir") {
			t.Fatalf("got %v, want a checkpoint dir error", err)
		}
		return
	}
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o555); err != nil {
		t.Fatal(err)
	}
	j := tinyJob(t)
	j.CheckpointDir = dir
	_, err := Run(context.Background(), j, Options{})
	if err == nil || !strings.Contains(err.Error(), "not writable") {
		t.Fatalf("got %v, want a not-writable error", err)
	}
}

func TestParseJob(t *testing.T) {
	good := `version: 1
preset: mamba-tiny
steps: 5
batch_size: 3
model:
  d_state: 8
  n_layer: 2
`
	j, err := ParseJob("job.yaml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if j.Model.DState != 8 || j.Model.NLayer != 2 || len(j.Model.Mixers) != 2 || j.Model.DModel != 64 || j.Steps != 5 {
		t.Fatalf("parsed %+v", j)
	}
	bad := []struct{ name, yaml, want string }{
		{"no version", "preset: bmojo\n", "version"},
		{"future version", "version: 2\n", "version"},
		{"typo", "version: 1\nstepz: 4\n", "stepz"},
		{"unknown preset", "version: 1\npreset: gpt9\n", "gpt9"},
		{"bad model key value", "version: 1\nmodel:\n  d_model: -4\n", "d_model"},
		{"zero steps", "version: 1\nsteps: 0\n", "steps"},
		{"heads", "version: 1\npreset: bmojo-tiny\nmodel:\n  n_kv_head: 3\n", "n_kv_head"},
		{"window > seq", "version: 1\npreset: swa-tiny\nmodel:\n  window: 999\n", "window"},
		{"not yaml", "version: 1\n\t- [", "job.yaml"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseJob("job.yaml", []byte(tc.yaml))
			if !errors.Is(err, ErrJob) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrJob naming %q", err, tc.want)
			}
		})
	}
}
