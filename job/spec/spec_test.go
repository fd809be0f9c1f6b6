package spec

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/bmojo/bmojo/internal/etcdtest"
	"github.com/bmojo/bmojo/internal/testleak"
	"github.com/bmojo/bmojo/job"
)

func TestMain(m *testing.M) { testleak.Main(m) }

// TestPutSpecRefusesAChangedJob: the job spec in etcd pins a job; putting
// it again with a setting that changes what the job computes is refused
// with an error naming the setting (as a single-process resume is), and the
// same job again resumes.
func TestPutSpecRefusesAChangedJob(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cli := etcdtest.Start(t)
	j := job.Default()
	j.Name, j.CheckpointDir = "spec-test", t.TempDir()
	if _, resumed, err := Put(ctx, cli, j, 2, 1, "code"); err != nil || resumed {
		t.Fatalf("first put: resumed %v, err %v", resumed, err)
	}
	if _, resumed, err := Put(ctx, cli, j, 2, 1, "code"); err != nil || !resumed {
		t.Fatalf("same job again: resumed %v, err %v", resumed, err)
	}
	for _, tc := range []struct {
		tweak func(*job.Job)
		want  string
	}{
		{func(j *job.Job) { j.Steps = 900 }, "steps: 600 -> 900"},
		{func(j *job.Job) { j.LR = 1e-3 }, "lr: 0.003 -> 0.001"},
		{func(j *job.Job) { j.Model.DModel = 32 }, "model.d_model: 64 -> 32"},
	} {
		k := j
		k.Model, _ = k.ModelConfig()
		tc.tweak(&k)
		_, _, err := Put(ctx, cli, k, 2, 1, "code")
		if !errors.Is(err, job.ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("changed job: %v; want an job.ErrInvalid naming %q", err, tc.want)
		}
	}
}
