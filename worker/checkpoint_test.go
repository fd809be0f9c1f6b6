package worker

import (
	"context"
	"math"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/internal/etcdtest"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/kernels/cpu"
	"github.com/bmojo/bmojo/model"
	"github.com/bmojo/bmojo/train"
)

// TestCheckpointCommitPruneResume: rank 0's checkpoints are committed to
// etcd with the manifest Save returned; pruning deletes only old step-N
// directories under checkpoint_dir whatever a manifest names; a resume
// (every worker's start, a joiner's included) refuses a manifest naming
// another directory and a checkpoint with a flipped bit, and loads the
// newest good one bit for bit.
func TestCheckpointCommitPruneResume(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cli := etcdtest.Start(t)

	base := t.TempDir()
	root := filepath.Join(base, "ckpt")
	elsewhere := filepath.Join(base, "elsewhere")
	for _, d := range []string{root, elsewhere} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	precious := filepath.Join(elsewhere, "precious")
	if err := os.WriteFile(precious, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	newWorker := func(seed uint64) *worker {
		c, err := model.Preset("bmojo-tiny")
		if err != nil {
			t.Fatal(err)
		}
		m, err := model.New[float32](cpu.New[float32](), c, seed)
		if err != nil {
			t.Fatal(err)
		}
		j := job.Default()
		j.CheckpointDir, j.KeepCheckpoints, j.Seed, j.BatchSize = root, 2, 1, 4
		return &worker{cli: cli, prefix: job.Prefix("t"), log: hclog.NewNullLogger(), job: j,
			eng: &train.Engine{M: m, Opt: model.NewOptimizer(m, model.DefaultOptim(1e-3, 10)), GB: j.BatchSize}}
	}
	putManifest := func(man job.Manifest) {
		t.Helper()
		if _, err := cli.Put(ctx, job.Prefix("t")+job.CheckpointKey(man.Step), job.Encode(man)); err != nil {
			t.Fatal(err)
		}
	}

	w := newWorker(1)
	w.ckpt = &checkpointer{w: w}
	saved := map[int][]float32{}
	for _, step := range []int{2, 4, 6} {
		if step == 6 {
			// An older manifest naming a directory outside checkpoint_dir:
			// pruning it must leave that directory alone.
			putManifest(job.Manifest{Step: 1, Dir: filepath.Join(root, "..", "elsewhere")})
		}
		params := w.eng.M.ParamsF32()
		params[step] += 1 // each checkpoint different
		if err := w.eng.M.SetParamsF32(params); err != nil {
			t.Fatal(err)
		}
		w.eng.Step, w.eng.Skipped, w.eng.Opt.Step = step, 1, step-1
		w.ckpt.start(3, 0.5)
		w.ckpt.wait()
		saved[step] = params
	}
	dirs, err := checkpoint.List(root)
	if err != nil || !slices.Equal(dirs, []string{checkpoint.StepDir(root, 6), checkpoint.StepDir(root, 4)}) {
		t.Fatalf("checkpoint dirs after pruning to 2: %v (%v)", dirs, err)
	}
	resp, err := cli.Get(ctx, job.Prefix("t")+job.KeyCheckpoints, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, kv := range resp.Kvs {
		keys = append(keys, string(kv.Key))
	}
	want := []string{job.CheckpointKey(4), job.CheckpointKey(6), job.KeyLatestCkpt}
	for i := range want {
		want[i] = job.Prefix("t") + want[i]
	}
	if !slices.Equal(keys, want) {
		t.Fatalf("etcd holds %v, want %v", keys, want)
	}
	// The committed manifest is the one on disk.
	r, err := cli.Get(ctx, job.Prefix("t")+job.CheckpointKey(6))
	if err != nil {
		t.Fatal(err)
	}
	var man job.Manifest
	if err := job.Decode("m", r.Kvs[0].Value, &man); err != nil {
		t.Fatal(err)
	}
	disk, err := checkpoint.Verify(checkpoint.StepDir(root, 6))
	if err != nil || len(man.Files) != len(disk.Files) || man.Files[0].SHA256 != disk.Files[0].SHA256 || man.Config != disk.Config || man.Epoch != 3 {
		t.Fatalf("etcd manifest %+v, disk %+v (%v)", man, disk, err)
	}

	// The newest manifest names a directory outside checkpoint_dir, and the
	// newest real checkpoint has a flipped bit.
	putManifest(job.Manifest{Step: 9, Dir: elsewhere, Files: man.Files, Config: man.Config})
	weights := filepath.Join(checkpoint.StepDir(root, 6), checkpoint.WeightsFile)
	b, err := os.ReadFile(weights)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-4] ^= 1
	if err := os.WriteFile(weights, b, 0o644); err != nil {
		t.Fatal(err)
	}
	j := newWorker(2) // another init: the resume must replace it
	if err := j.resume(ctx); err != nil {
		t.Fatal(err)
	}
	if j.eng.Step != 4 || j.eng.Skipped != 1 || j.eng.Opt.Step != 3 {
		t.Fatalf("resumed at data step %d, skipped %d, optimizer step %d; want 4, 1, 3", j.eng.Step, j.eng.Skipped, j.eng.Opt.Step)
	}
	got := j.eng.M.ParamsF32()
	if !slices.EqualFunc(got, saved[4], func(a, b float32) bool { return math.Float32bits(a) == math.Float32bits(b) }) {
		t.Fatal("resumed parameters differ from step 4's")
	}
	if dirs, _ := checkpoint.List(root); !slices.Equal(dirs, []string{checkpoint.StepDir(root, 4)}) {
		t.Fatalf("after resume: %v, want the damaged step 6 set aside", dirs)
	}
	if _, err := os.Stat(precious); err != nil {
		t.Fatalf("a file outside checkpoint_dir is gone: %v", err)
	}
}
