package job

import (
	"fmt"
	"reflect"
	"strings"

	"go.yaml.in/yaml/v3"
)

// YAML is j as a job file (Parse reads it back to the same Job).
func (j Job) YAML() (string, error) {
	b, err := yaml.Marshal(j)
	if err != nil {
		return "", fmt.Errorf("%w: encode: %w", ErrInvalid, err)
	}
	return string(b), nil
}

// perProcess are the job fields a resumed job may change: they say how one
// process runs, not what the job computes or records.
var perProcess = map[string]bool{"name": true, "checkpoint_dir": true, "threads": true}

// Diff names the fields (by their job-file keys) in which j differs from
// the job old was started with, among those that a resume must keep: the
// model, the schedule (steps, lr, warmup_steps, batch_size, seed, ...), the
// data and the evaluation and checkpoint cadence. Each entry reads
// "key: old -> new". Name, checkpoint_dir and threads may change.
func (j Job) Diff(old Job) []string {
	// The preset fills an empty model: compare the models that train.
	mx, _ := old.ModelConfig()
	my, _ := j.ModelConfig()
	old.Model, j.Model = mx, my
	return diffFields(reflect.ValueOf(old), reflect.ValueOf(j), "")
}

// diffFields lists the yaml-tagged fields of two structs of one type that
// differ, descending into nested structs (model.x).
func diffFields(a, b reflect.Value, prefix string) []string {
	var out []string
	t := a.Type()
	for i := range t.NumField() {
		key, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ",")
		if key == "" || key == "-" || prefix == "" && perProcess[key] {
			continue
		}
		x, y := a.Field(i), b.Field(i)
		if reflect.DeepEqual(x.Interface(), y.Interface()) {
			continue
		}
		if x.Kind() == reflect.Struct {
			out = append(out, diffFields(x, y, prefix+key+".")...)
			continue
		}
		out = append(out, fmt.Sprintf("%s%s: %v -> %v", prefix, key, x.Interface(), y.Interface()))
	}
	return out
}

// ResumeError is the error for resuming old with j when they differ (nil
// when they do not): where names the job's store (a checkpoint directory).
func (j Job) ResumeError(old Job, where string) error {
	d := j.Diff(old)
	if len(d) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s holds job %q started with other settings (%s); resume it with the same job file and flags, or choose another checkpoint_dir",
		ErrInvalid, where, old.Name, strings.Join(d, "; "))
}
