package coordinator

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/bmojo/bmojo/internal/train"
)

// TestPutSpecRefusesAChangedJob: the job spec in etcd pins a job; putting
// it again with a setting that changes what the job computes is refused
// with an error naming the setting (as a single-process resume is), and the
// same job again resumes.
func TestPutSpecRefusesAChangedJob(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	e := newEnv(t, ctx, 1)
	j := train.Default()
	j.Name, j.CheckpointDir = "spec-test", t.TempDir()
	if _, resumed, err := PutSpec(ctx, e.cli, j, 2, 1, "code"); err != nil || resumed {
		t.Fatalf("first put: resumed %v, err %v", resumed, err)
	}
	if _, resumed, err := PutSpec(ctx, e.cli, j, 2, 1, "code"); err != nil || !resumed {
		t.Fatalf("same job again: resumed %v, err %v", resumed, err)
	}
	for _, tc := range []struct {
		tweak func(*train.Job)
		want  string
	}{
		{func(j *train.Job) { j.Steps = 900 }, "steps: 600 -> 900"},
		{func(j *train.Job) { j.LR = 1e-3 }, "lr: 0.003 -> 0.001"},
		{func(j *train.Job) { j.Model.DModel = 32 }, "model.d_model: 64 -> 32"},
	} {
		k := j
		k.Model, _ = k.ModelConfig()
		tc.tweak(&k)
		_, _, err := PutSpec(ctx, e.cli, k, 2, 1, "code")
		if !errors.Is(err, train.ErrJob) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("changed job: %v; want an ErrJob naming %q", err, tc.want)
		}
	}
}
