package worker

import (
	"context"
	"errors"
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
	w.commits = newCommitter(cli, job.Prefix("t"), w.log)
	t.Cleanup(w.commits.close)
	w.commits.setFence(putRing(ctx, t, cli, 3)) // rank 0 of the ring of epoch 3
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

// ckptWorker is a rank-0 worker of the test job ("t") for checkpoint tests:
// a bmojo-tiny model initialised from seed, checkpoint_dir root, and a
// committer whose writes are fenced on the ring record at revision fence
// (what entering a ring's epoch sets, driver.go).
func ckptWorker(t *testing.T, cli *clientv3.Client, root string, seed uint64, fence int64) *worker {
	t.Helper()
	c, err := model.Preset("bmojo-tiny")
	if err != nil {
		t.Fatal(err)
	}
	m, err := model.New[float32](cpu.New[float32](), c, seed)
	if err != nil {
		t.Fatal(err)
	}
	j := job.Default()
	j.CheckpointDir, j.Seed, j.BatchSize = root, 1, 4
	w := &worker{cli: cli, prefix: prefix, log: hclog.NewNullLogger(), job: j,
		eng: &train.Engine{M: m, Opt: model.NewOptimizer(m, model.DefaultOptim(1e-3, 10)), GB: j.BatchSize}}
	w.commits = newCommitter(cli, prefix, w.log)
	t.Cleanup(w.commits.close)
	w.commits.setFence(fence)
	w.ckpt = &checkpointer{w: w}
	return w
}

// checkpointStep has w checkpoint its state as data step step of ring
// epoch epoch (rank 0's Checkpoint action) and waits for the background
// write and commit, bounded by ctx.
func checkpointStep(ctx context.Context, t *testing.T, w *worker, step int, epoch uint64) {
	t.Helper()
	w.eng.Step, w.eng.Opt.Step = step, step
	w.ckpt.start(epoch, 0.5)
	done := make(chan struct{})
	go func() { w.ckpt.wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatalf("checkpoint of step %d did not finish: %v", step, ctx.Err())
	}
}

// committed returns the manifest etcd holds for step (ok false: none) and
// the value of checkpoints/latest ("" if none).
func committed(ctx context.Context, t *testing.T, cli *clientv3.Client, step int) (man job.Manifest, ok bool, latest string) {
	t.Helper()
	r, err := cli.Get(ctx, prefix+job.CheckpointKey(step))
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Kvs) == 1 {
		if err := job.Decode("manifest", r.Kvs[0].Value, &man); err != nil {
			t.Fatal(err)
		}
		ok = true
	}
	l, err := cli.Get(ctx, prefix+job.KeyLatestCkpt)
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Kvs) == 1 {
		latest = string(l.Kvs[0].Value)
	}
	return man, ok, latest
}

// TestCheckpointStaleWriterRefused: a rank 0 whose ring was superseded
// (partitioned, its lease expired, a new ring formed without it, but the
// process still runs) cannot commit a checkpoint manifest nor move latest
// back: its write is refused, and the new ring's checkpoints stand.
func TestCheckpointStaleWriterRefused(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cli := etcdtest.Start(t)
	root := t.TempDir()

	fence1 := putRing(ctx, t, cli, 1)
	stale := ckptWorker(t, cli, root, 1, fence1)
	checkpointStep(ctx, t, stale, 2, 1)
	if _, ok, latest := committed(ctx, t, cli, 2); !ok || latest != "2" {
		t.Fatalf("epoch 1's checkpoint of step 2: committed %v, latest %q", ok, latest)
	}
	// Epoch 2 forms without the old rank 0 and commits step 6.
	cur := ckptWorker(t, cli, root, 2, putRing(ctx, t, cli, 2))
	checkpointStep(ctx, t, cur, 6, 2)
	// The old rank 0 still runs and checkpoints step 4 of epoch 1.
	checkpointStep(ctx, t, stale, 4, 1)

	if man, ok, _ := committed(ctx, t, cli, 4); ok {
		t.Errorf("the stale writer committed a manifest of step 4: %+v", man)
	}
	man, ok, latest := committed(ctx, t, cli, 6)
	if latest != "6" {
		t.Errorf("latest = %q after the stale writer's checkpoint, want 6 (it moved backwards)", latest)
	}
	if !ok || man.Epoch != 2 {
		t.Errorf("epoch 2's manifest of step 6: %+v (committed %v)", man, ok)
	}
	if _, err := os.Stat(checkpoint.StepDir(root, 4)); !os.IsNotExist(err) {
		t.Errorf("a writer refused before it wrote left %s (stat: %v)", checkpoint.StepDir(root, 4), err)
	}

	// The refusal is an error that says so, and nothing is written.
	ck, err := stale.eng.Snapshot(stale.job, 0.5)
	if err != nil {
		t.Fatal(err)
	}
	if err := stale.ckpt.save(ctx, ck, 1, fence1); !errors.Is(err, ErrFenced) {
		t.Errorf("the stale writer's save: %v, want %v", err, ErrFenced)
	}
	// A writer superseded between its check and its commit (the files are
	// written by then): the commit transaction itself is refused.
	late := job.Manifest{Step: 8, Epoch: 1, Dir: checkpoint.StepDir(root, 8), Files: man.Files, Config: man.Config}
	if err := stale.ckpt.commit(ctx, late, fence1); !errors.Is(err, ErrFenced) {
		t.Errorf("the stale writer's commit of step 8: %v, want %v", err, ErrFenced)
	}
	if _, ok, latest := committed(ctx, t, cli, 8); ok || latest != "6" {
		t.Errorf("after the stale commit of step 8: committed %v, latest %q; want none, 6", ok, latest)
	}
	if dirs, err := checkpoint.List(root); err != nil || !slices.Equal(dirs, []string{checkpoint.StepDir(root, 6), checkpoint.StepDir(root, 2)}) {
		t.Errorf("checkpoint_dir holds %v (%v), want steps 6 and 2 only", dirs, err)
	}
}

// TestCheckpointLatestNeverBackwards: even under a current ring, a
// checkpoint older than the one latest names is not committed and latest
// keeps its step; a checkpoint of that step or a newer one moves it.
func TestCheckpointLatestNeverBackwards(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cli := etcdtest.Start(t)
	root := t.TempDir()
	fence := putRing(ctx, t, cli, 1)
	w := ckptWorker(t, cli, root, 1, fence)
	// A newer checkpoint is committed already (by this job before a restart
	// that resumed from an older one, its newest being damaged).
	if _, err := cli.Put(ctx, prefix+job.KeyLatestCkpt, "8"); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name       string
		step       int
		err        error // of save
		latest     string
		manifested bool
	}{
		{name: "older", step: 4, err: ErrBehindLatest, latest: "8", manifested: false},
		{name: "same step", step: 8, latest: "8", manifested: true},
		{name: "same step again", step: 8, err: errCommitted, latest: "8", manifested: true},
		{name: "newer", step: 10, latest: "10", manifested: true},
		{name: "older than the new latest", step: 9, err: ErrBehindLatest, latest: "10", manifested: false},
	} {
		t.Run(c.name, func(t *testing.T) {
			w.eng.Step, w.eng.Opt.Step = c.step, c.step
			ck, err := w.eng.Snapshot(w.job, 0.5)
			if err != nil {
				t.Fatal(err)
			}
			if err := w.ckpt.save(ctx, ck, 1, fence); !errors.Is(err, c.err) {
				t.Errorf("save of step %d: %v, want %v", c.step, err, c.err)
			}
			_, ok, latest := committed(ctx, t, cli, c.step)
			if ok != c.manifested || latest != c.latest {
				t.Errorf("checkpoint of step %d: manifest committed %v, latest %q; want %v, %q", c.step, ok, latest, c.manifested, c.latest)
			}
		})
	}
	// The commit transaction checks latest itself, not only the read
	// before the files are written.
	man, _, _ := committed(ctx, t, cli, 10)
	man.Step = 9
	if err := w.ckpt.commit(ctx, man, fence); !errors.Is(err, ErrBehindLatest) {
		t.Errorf("commit of step 9 under latest 10: %v, want %v", err, ErrBehindLatest)
	}
	// Through the worker's path (start, in the background): refused, and
	// latest stays.
	checkpointStep(ctx, t, w, 6, 1)
	if _, ok, latest := committed(ctx, t, cli, 6); ok || latest != "10" {
		t.Errorf("checkpoint of step 6: committed %v, latest %q; want none, 10", ok, latest)
	}
}

// TestCheckpointStaleDirectory: a superseded rank 0 left a complete
// step-6 directory it never committed; the new ring's checkpoint of step 6
// is still written and committed (not skipped as "already written"), a
// resume loads the new ring's state bit for bit, and the leftover is not
// modified.
func TestCheckpointStaleDirectory(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cli := etcdtest.Start(t)
	root := t.TempDir()

	stale := ckptWorker(t, cli, root, 1, putRing(ctx, t, cli, 1))
	stale.eng.Step, stale.eng.Opt.Step = 6, 6
	ck, err := stale.eng.Snapshot(stale.job, 0.5)
	if err != nil {
		t.Fatal(err)
	}
	left, err := checkpoint.Save(root, ck) // written; its commit never landed
	if err != nil {
		t.Fatal(err)
	}

	cur := ckptWorker(t, cli, root, 2, putRing(ctx, t, cli, 2))
	checkpointStep(ctx, t, cur, 6, 2)
	man, ok, latest := committed(ctx, t, cli, 6)
	if !ok || man.Epoch != 2 || latest != "6" {
		t.Fatalf("the new ring's checkpoint of step 6: manifest %+v (committed %v), latest %q", man, ok, latest)
	}
	if want := checkpoint.AttemptDir(root, 6, 2); man.Dir != want {
		t.Errorf("the manifest names %s, want the fresh %s", man.Dir, want)
	}
	r := ckptWorker(t, cli, root, 3, 0)
	if err := r.resume(ctx); err != nil {
		t.Fatal(err)
	}
	if r.eng.Step != 6 || !slices.EqualFunc(r.eng.M.ParamsF32(), cur.eng.M.ParamsF32(), func(a, b float32) bool { return math.Float32bits(a) == math.Float32bits(b) }) {
		t.Fatalf("resumed at step %d with parameters other than the new ring's (the stale writer's?)", r.eng.Step)
	}
	if got, err := checkpoint.Verify(left.Dir); err != nil || got.Files[0].SHA256 != left.Files[0].SHA256 {
		t.Fatalf("the leftover %s was modified: %v", left.Dir, err)
	}
}
