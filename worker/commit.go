package worker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/internal/cluster"
	"github.com/bmojo/bmojo/internal/train"
	"github.com/bmojo/bmojo/model"
)

// committer writes progress and ledger records to etcd in order, in the
// background, retrying while etcd is unavailable: training never waits for
// etcd, and nothing queued is lost.
type committer struct {
	cli    *clientv3.Client
	prefix string
	log    hclog.Logger

	mu      sync.Mutex
	cond    *sync.Cond
	queue   [][2]string
	busy    bool
	closed  bool
	stopped chan struct{}
}

func newCommitter(cli *clientv3.Client, prefix string, log hclog.Logger) *committer {
	c := &committer{cli: cli, prefix: prefix, log: log, stopped: make(chan struct{})}
	c.cond = sync.NewCond(&c.mu)
	go c.run()
	return c
}

func (c *committer) add(key, value string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.queue = append(c.queue, [2]string{key, value})
	c.cond.Broadcast()
}

func (c *committer) run() {
	defer close(c.stopped)
	failures := 0
	for {
		c.mu.Lock()
		for len(c.queue) == 0 && !c.closed {
			c.cond.Wait()
		}
		if len(c.queue) == 0 && c.closed {
			c.mu.Unlock()
			return
		}
		batch := c.queue[:len(c.queue):len(c.queue)] // appends during the write go to a new array
		c.busy = true
		c.mu.Unlock()
		// etcd refuses a transaction that names a key twice, and progress
		// and stats records repeat: keep each key's newest value, at its
		// newest position (so done stays last).
		last := make(map[string]int, len(batch))
		for i, kv := range batch {
			last[kv[0]] = i
		}
		ops := make([]clientv3.Op, 0, len(last))
		for i, kv := range batch {
			if last[kv[0]] == i {
				ops = append(ops, clientv3.OpPut(c.prefix+kv[0], kv[1]))
			}
		}
		// A short deadline: a write caught by an etcd outage is retried with
		// everything queued meanwhile instead of landing late with a stale
		// batch (progress would then lag the workers after the outage).
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		var err error
		for i := 0; i < len(ops) && err == nil; i += 64 { // etcd caps ops per txn
			_, err = c.cli.Txn(ctx).Then(ops[i:min(i+64, len(ops))]...).Commit()
		}
		cancel()
		c.mu.Lock()
		c.busy = false
		if err == nil {
			c.queue = c.queue[len(batch):]
			failures = 0
		} else {
			failures++
		}
		closed := c.closed
		c.cond.Broadcast()
		c.mu.Unlock()
		if err != nil {
			if failures == 1 || failures%20 == 0 {
				c.log.Warn("etcd write failed; progress and ledger stay queued", "queued", len(batch), "error", err)
			}
			if closed && failures > 20 {
				return
			}
			time.Sleep(250 * time.Millisecond)
		}
	}
}

// flush waits until everything queued so far is in etcd (or ctx ends).
func (c *committer) flush(ctx context.Context) {
	done := make(chan struct{})
	go func() {
		c.mu.Lock()
		for (len(c.queue) > 0 || c.busy) && ctx.Err() == nil {
			c.cond.Wait()
		}
		c.mu.Unlock()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		c.cond.Broadcast()
	}
}

func (c *committer) close() {
	c.mu.Lock()
	if !c.closed {
		c.closed = true
		c.cond.Broadcast()
	}
	c.mu.Unlock()
	select {
	case <-c.stopped:
	case <-time.After(10 * time.Second):
	}
}

// checkpointer writes checkpoints in the background from a host snapshot,
// then commits their manifest to etcd in one transaction.
type checkpointer struct {
	w       *worker
	wg      sync.WaitGroup
	mu      sync.Mutex
	running bool
	last    time.Duration // duration of the last committed checkpoint
}

func (c *checkpointer) lastSeconds() float64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.last.Seconds()
}

func (c *checkpointer) start(epoch uint64, val float64) {
	c.mu.Lock()
	if c.running {
		c.mu.Unlock()
		c.w.log.Warn("previous checkpoint still writing; skipping this one", "step", c.w.step)
		return
	}
	c.running = true
	c.mu.Unlock()
	w := c.w
	mom, vel := w.opt.Moments()
	ck := train.Checkpoint{Config: w.m.Cfg, Params: w.m.ParamsHost(), M: mom, V: vel,
		State: train.State{Step: w.step, Seed: w.job.Seed, BatchSize: w.job.BatchSize, SeqLen: w.m.Cfg.SeqLen,
			Skipped: w.skipped, ValLoss: val}}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer func() { c.mu.Lock(); c.running = false; c.mu.Unlock() }()
		t0 := time.Now()
		dir, err := train.SaveCheckpoint(w.job.CheckpointDir, ck)
		if err != nil {
			w.log.Warn("checkpoint failed", "step", ck.State.Step, "error", err)
			return
		}
		man := cluster.Manifest{Step: ck.State.Step, Epoch: epoch, Dir: dir, Config: model.ConfigMetadata(ck.Config)[model.ConfigKey]}
		for _, name := range []string{train.WeightsFile, train.OptimFile, train.StateFile} {
			f, err := hashFile(filepath.Join(dir, name))
			if err != nil {
				w.log.Warn("checkpoint failed", "step", ck.State.Step, "error", err)
				return
			}
			man.Files = append(man.Files, f)
		}
		for attempt := 0; ; attempt++ {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err = w.cli.Txn(ctx).Then(
				clientv3.OpPut(w.key(cluster.CheckpointKey(man.Step)), cluster.Encode(man)),
				clientv3.OpPut(w.key(cluster.KeyLatestCkpt), strconv.Itoa(man.Step)),
			).Commit()
			cancel()
			if err == nil || attempt > 40 {
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
		if err != nil {
			w.log.Warn("checkpoint written but not committed to etcd", "dir", dir, "error", err)
			return
		}
		c.mu.Lock()
		c.last = time.Since(t0)
		c.mu.Unlock()
		c.prune()
		w.log.Info("checkpoint committed", "step", man.Step, "dir", dir, "duration", time.Since(t0).Round(time.Millisecond))
	}()
}

func (c *checkpointer) wait() { c.wg.Wait() }

// prune keeps the job's newest keep_checkpoints committed checkpoints: each
// older manifest leaves etcd first, then its directory, so a resume never
// finds a manifest without its files.
func (c *checkpointer) prune() {
	w := c.w
	keep := w.job.KeepCheckpoints
	if keep <= 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := w.cli.Get(ctx, w.key(cluster.KeyCheckpoints), clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend))
	if err != nil {
		return // next time
	}
	n := 0
	for _, kv := range resp.Kvs {
		if string(kv.Key) == w.key(cluster.KeyLatestCkpt) {
			continue
		}
		if n++; n <= keep {
			continue
		}
		var man cluster.Manifest
		if cluster.Decode(string(kv.Key), kv.Value, &man) != nil {
			continue
		}
		if _, err := w.cli.Delete(ctx, string(kv.Key)); err != nil {
			return
		}
		if err := os.RemoveAll(man.Dir); err != nil {
			w.log.Warn("could not remove old checkpoint", "dir", man.Dir, "error", err)
		}
	}
}

func hashFile(path string) (cluster.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return cluster.File{}, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return cluster.File{}, fmt.Errorf("hash %s: %w", path, err)
	}
	return cluster.File{Name: filepath.Base(path), Size: n, SHA256: hex.EncodeToString(h.Sum(nil))}, nil
}

// resume loads the newest committed checkpoint whose files match their
// manifest, falling back to older ones with a warning.
func (w *worker) resume(ctx context.Context) error {
	resp, err := w.cli.Get(ctx, w.key(cluster.KeyCheckpoints), clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend))
	if err != nil {
		return fmt.Errorf("worker: read checkpoint manifests: %w", err)
	}
	for _, kv := range resp.Kvs {
		if string(kv.Key) == w.key(cluster.KeyLatestCkpt) {
			continue
		}
		var man cluster.Manifest
		if err := cluster.Decode(string(kv.Key), kv.Value, &man); err != nil {
			w.log.Warn("skipping checkpoint", "key", string(kv.Key), "error", err)
			continue
		}
		if err := verify(man); err != nil {
			w.setAside(man.Dir, err)
			continue
		}
		ck, err := train.LoadCheckpoint(man.Dir)
		if err != nil {
			w.setAside(man.Dir, err)
			continue
		}
		if a, b := model.ConfigMetadata(ck.Config)[model.ConfigKey], model.ConfigMetadata(w.m.Cfg)[model.ConfigKey]; a != b {
			return fmt.Errorf("worker: checkpoint %s has another model config than the job", man.Dir)
		}
		if err := w.m.SetParams(ck.Params); err != nil {
			return err
		}
		w.step, w.skipped = ck.State.Step, ck.State.Skipped
		if err := w.opt.SetMoments(ck.M, ck.V, ck.State.Step-ck.State.Skipped); err != nil {
			return err
		}
		w.log.Info("resumed from checkpoint", "dir", man.Dir, "step", w.step)
		return nil
	}
	return nil
}

// setAside warns about a damaged checkpoint and renames its directory
// (kept for inspection) so the step can be checkpointed again. Another
// worker sharing the directory may have renamed it first.
func (w *worker) setAside(dir string, err error) {
	aside := fmt.Sprintf("%s.damaged-%d", dir, time.Now().Unix())
	w.log.Warn("skipping checkpoint", "dir", dir, "error", err, "moved_to", aside)
	if rerr := os.Rename(dir, aside); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		w.log.Warn("could not set the damaged checkpoint aside", "dir", dir, "error", rerr)
	}
}

var errManifest = errors.New("checkpoint does not match its manifest")

func verify(man cluster.Manifest) error {
	for _, f := range man.Files {
		got, err := hashFile(filepath.Join(man.Dir, f.Name))
		if err != nil {
			return fmt.Errorf("%w: %v", errManifest, err)
		}
		if got.Size != f.Size || got.SHA256 != f.SHA256 {
			return fmt.Errorf("%w: %s: size %d sha256 %s, manifest says size %d sha256 %s",
				errManifest, filepath.Join(man.Dir, f.Name), got.Size, got.SHA256[:12], f.Size, f.SHA256[:12])
		}
	}
	return nil
}

// listenRetry listens on addr again after the previous epoch's ring closed
// it (the port may take a moment to be released).
func listenRetry(ctx context.Context, addr string) (net.Listener, error) {
	var err error
	for i := 0; i < 50; i++ {
		var lis net.Listener
		if lis, err = net.Listen("tcp", addr); err == nil {
			return lis, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil, fmt.Errorf("worker: listen on %s: %w", addr, err)
}
