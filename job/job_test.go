package job

import (
	"errors"
	"strings"
	"testing"
)

func TestParseJob(t *testing.T) {
	good := `version: 1
preset: mamba-tiny
steps: 5
batch_size: 3
model:
  d_state: 8
  n_layer: 2
`
	j, err := Parse("job.yaml", []byte(good))
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
			_, err := Parse("job.yaml", []byte(tc.yaml))
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want ErrInvalid naming %q", err, tc.want)
			}
		})
	}
}

// TestDiffNamesWhatChanged: Diff lists the settings a resume must keep that
// differ, by job-file key, with old and new values; per-process settings
// (threads, name, checkpoint_dir) are not among them.
func TestDiffNamesWhatChanged(t *testing.T) {
	a := Default()
	b := a
	b.Threads, b.Name, b.CheckpointDir = 1, "other", "/elsewhere"
	if d := b.Diff(a); len(d) != 0 {
		t.Fatalf("per-process changes reported: %v", d)
	}
	b.Steps, b.LR = 900, 1e-3
	b.Model, _ = a.ModelConfig()
	b.Model.DState = 4
	got := strings.Join(b.Diff(a), "; ")
	for _, want := range []string{"steps: 600 -> 900", "lr: 0.003 -> 0.001", "model.d_state: 16 -> 4"} {
		if !strings.Contains(got, want) {
			t.Errorf("Diff = %q, want it to name %q", got, want)
		}
	}
	if err := b.ResumeError(a, "dir"); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "steps: 600 -> 900") {
		t.Errorf("ResumeError = %v", err)
	}
}

// TestAllReduceSetting: the job's all-reduce scheme is validated by name,
// auto is stored as the default's one spelling (so a job file that says
// auto resumes one that said nothing), and the default leaves the job
// file as it was.
func TestAllReduceSetting(t *testing.T) {
	for _, tc := range []struct{ value, want, err string }{
		{"", "", ""},
		{"auto", "", ""},
		{"flat", "flat", ""},
		{"hier", "hier", ""},
		{"ring", "", "allreduce must be auto, flat or hier"},
	} {
		t.Run("value="+tc.value, func(t *testing.T) {
			y := "version: 1\nsteps: 5\n"
			if tc.value != "" {
				y += "allreduce: " + tc.value + "\n"
			}
			j, err := Parse("job.yaml", []byte(y))
			if tc.err != "" {
				if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %v, want ErrInvalid saying %q", err, tc.err)
				}
				return
			}
			if err != nil || j.AllReduce != tc.want {
				t.Fatalf("got %q, %v; want %q", j.AllReduce, err, tc.want)
			}
			out, err := j.YAML()
			if err != nil {
				t.Fatal(err)
			}
			if has := strings.Contains(out, "allreduce:"); has != (tc.want != "") {
				t.Fatalf("YAML of allreduce %q:\n%s", tc.want, out)
			}
			if d := j.Diff(Default()); tc.want == "" && len(d) > 0 && strings.Contains(strings.Join(d, ";"), "allreduce") {
				t.Fatalf("the default differs from itself: %v", d)
			}
		})
	}
}
