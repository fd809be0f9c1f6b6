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

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/model"
)

func tinyJob(t *testing.T) job.Job {
	t.Helper()
	j := job.Default()
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

func run(t *testing.T, j job.Job) (Result, *captureLog) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cl := &captureLog{}
	res, err := Run(ctx, j, Options{Logger: hclog.New(&hclog.LoggerOptions{Output: cl, Level: hclog.Debug})})
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
// follows exactly the loss curve of an uninterrupted run (docs/system.md: "on the
// CPU backend the resumed loss curve equals an uninterrupted run's").
func TestResumeIsBitwiseIdentical(t *testing.T) {
	full := tinyJob(t)
	want, _ := run(t, full)
	if len(want.Losses) != 6 || !(want.Losses[5] < want.Losses[0]) {
		t.Fatalf("uninterrupted losses %v: want 6 falling", want.Losses)
	}

	// Interrupt after step 3: the step-6 checkpoint never happened.
	part := full
	if err := os.RemoveAll(filepath.Join(part.CheckpointDir, "step-00000006")); err != nil {
		t.Fatal(err)
	}
	got, logs := run(t, part)
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

// TestCorruptCheckpointFallsBackToPrevious: one flipped bit in the newest
// checkpoint's weights (which still parse) is caught by its SHA-256: the
// resume warns naming the file, sets the checkpoint aside, redoes steps 4..6
// from step 3 identically and writes step 6 again.
func TestCorruptCheckpointFallsBackToPrevious(t *testing.T) {
	j := tinyJob(t)
	j.Steps = 6
	first, _ := run(t, j)
	newest := filepath.Join(j.CheckpointDir, "step-00000006", checkpoint.WeightsFile)
	b, err := os.ReadFile(newest)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-4] ^= 0x04 // a low mantissa bit of the last parameter (little-endian float32)
	if err := os.WriteFile(newest, b, 0o644); err != nil {
		t.Fatal(err)
	}
	again, logs := run(t, j)
	if !strings.Contains(logs.String(), "skipping damaged checkpoint") || !strings.Contains(logs.String(), newest) {
		t.Fatalf("no warning naming %s:\n%s", newest, logs.String())
	}
	if again.ResumedFrom != filepath.Join(j.CheckpointDir, "step-00000003") {
		t.Fatalf("resumed from %q, want step 3", again.ResumedFrom)
	}
	if !sameBits(again.Losses, first.Losses) {
		t.Fatalf("losses after fallback %v, first run %v", again.Losses, first.Losses)
	}
	if _, err := checkpoint.Load(filepath.Join(j.CheckpointDir, "step-00000006")); err != nil {
		t.Fatalf("step 6 was not written again: %v", err)
	}
}

// TestFinishedJobIsNotOverwritten: the same job again on its checkpoint
// directory says it is finished and changes nothing.
func TestFinishedJobIsNotOverwritten(t *testing.T) {
	j := tinyJob(t)
	j.Steps = 3
	run(t, j)
	before, err := os.ReadFile(filepath.Join(j.CheckpointDir, "step-00000003", checkpoint.WeightsFile))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err = Run(ctx, j, Options{})
	if !errors.Is(err, ErrFinished) || !strings.Contains(err.Error(), "step 3") {
		t.Fatalf("second run of a finished job: %v; want ErrFinished naming step 3", err)
	}
	after, _ := os.ReadFile(filepath.Join(j.CheckpointDir, "step-00000003", checkpoint.WeightsFile))
	if string(before) != string(after) {
		t.Fatal("existing checkpoint changed")
	}
}

// TestResumeRejectsDifferentJob: a checkpoint directory resumes only the job
// it was started with; any setting that changes what it computes is refused
// with an error naming the field, old and new value.
func TestResumeRejectsDifferentJob(t *testing.T) {
	j := tinyJob(t)
	j.Steps = 6
	j.CheckpointEvery = 3
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	part := j
	if err := os.MkdirAll(j.CheckpointDir, 0o755); err != nil {
		t.Fatal(err)
	}
	// Stop after the step-3 checkpoint: a cancelled run saves its last step.
	stop, cancelRun := context.WithCancel(ctx)
	go func() {
		for range time.Tick(5 * time.Millisecond) {
			if _, err := os.Stat(filepath.Join(j.CheckpointDir, "step-00000003")); err == nil {
				cancelRun()
				return
			}
		}
	}()
	if _, err := Run(stop, part, Options{}); err == nil {
		// The run may finish before the cancel lands: remove what came after.
		if err := os.RemoveAll(filepath.Join(j.CheckpointDir, "step-00000006")); err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		name  string
		tweak func(*job.Job)
		want  string
	}{
		{"model", func(j *job.Job) { j.Model.DFF = 64 }, "model.d_ff: "},
		{"batch", func(j *job.Job) { j.BatchSize = 3 }, "batch_size: 2 -> 3"},
		{"seed", func(j *job.Job) { j.Seed = 9 }, "seed: 1 -> 9"},
		{"steps", func(j *job.Job) { j.Steps = 12 }, "steps: 6 -> 12"},
		{"lr", func(j *job.Job) { j.LR = 1e-3 }, "lr: 0.003 -> 0.001"},
		{"warmup", func(j *job.Job) { j.WarmupSteps = 2 }, "warmup_steps: 0 -> 2"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			k := j
			tc.tweak(&k)
			_, err := Run(ctx, k, Options{})
			if !errors.Is(err, job.ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an job.ErrInvalid naming %q", err, tc.want)
			}
		})
	}
	// Threads say how this process runs: a resume may change them.
	k := j
	k.Threads = 1
	if _, err := Run(ctx, k, Options{}); err != nil {
		t.Fatalf("resume with other threads: %v", err)
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
