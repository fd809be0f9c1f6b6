package worker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/checkpoint"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/model"
)

// committer writes this worker's records (ledger entries, progress, stats,
// done) to etcd in order, in the background, retrying while etcd is
// unavailable: training never waits for etcd, and nothing queued is lost.
//
// Every write is fenced: a batch is one transaction that holds only while
// the ring record's mod revision is the fence, the ring this worker is a
// member of (setFence). When the ring has changed, the batch stays queued
// until a new fence comes (the worker is a member of the new ring) and is
// written under it; a worker of a stale ring writes nothing. Ledger entries
// are only created, never rewritten (a step's first committed entry stands).
//
// Entries a worker holds for rank 0 (backup) are not written at once: they
// join the queue when the fence changes (the ring changed: rank 0 may have
// died with entries unwritten) and when the committer closes, and are
// dropped, every backupTrim entries, once etcd has them.
type committer struct {
	cli     *clientv3.Client
	prefix  string
	ringKey string
	log     hclog.Logger

	mu      sync.Mutex
	cond    *sync.Cond
	queue   []record
	busy    bool
	closed  bool
	fence   int64 // the ring's mod revision writes are fenced on; 0: none
	stale   bool  // the ring moved past the fence: writes wait for a new one
	backup  map[int]string
	added   int  // backups added since the last trim
	trimNow bool // run should drop the backups etcd has
	stopped chan struct{}
}

// record is one queued write.
type record struct {
	key, value string
	create     bool // a ledger entry: written only if the key does not exist
}

// backupTrim is how many backup entries a worker adds between two reads
// that drop those etcd already has.
const backupTrim = 128

// Sentinel errors of the worker's etcd writes.
var (
	// ErrFenced: a write was refused, or queued writes cannot land,
	// because this worker is not a member of the current ring (the ring
	// record moved past the revision its writes are fenced on).
	ErrFenced = errors.New("worker: not a member of the current ring: writes are fenced off")
	// ErrBehindLatest: a checkpoint manifest was refused because
	// checkpoints/latest names a newer step; latest never moves back.
	ErrBehindLatest = errors.New("worker: a newer checkpoint is committed: latest never moves back")
)

// errCommitted: the checkpoint of a step is committed already (a ring
// that starts at a checkpoint step checkpoints it again): nothing to do.
var errCommitted = errors.New("worker: this step's checkpoint is committed already")

func newCommitter(cli *clientv3.Client, prefix string, log hclog.Logger) *committer {
	c := &committer{cli: cli, prefix: prefix, ringKey: prefix + job.KeyRing, log: log,
		backup: map[int]string{}, stopped: make(chan struct{})}
	c.cond = sync.NewCond(&c.mu)
	go c.run()
	return c
}

func (c *committer) add(key, value string) { c.push(record{key: key, value: value}) }

func (c *committer) push(r record) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.queue = append(c.queue, r)
	c.cond.Broadcast()
}

// addLedger queues the entry of step for writing (primary: rank 0) or holds
// it for rank 0 (see committer).
func (c *committer) addLedger(step int, value string, primary bool) {
	if primary {
		c.push(record{key: job.LedgerKey(step), value: value, create: true})
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.backup[step] = value
	if c.added++; c.added >= backupTrim {
		c.added, c.trimNow = 0, true
		c.cond.Broadcast()
	}
}

// setFence fences every write from now on on the ring record at mod
// revision rev (0: hold writes). A new ring may mean rank 0 died with
// entries unwritten: the backups join the queue.
func (c *committer) setFence(rev int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.fence, c.stale = rev, false
	if rev != 0 {
		c.queueBackups()
	}
	c.cond.Broadcast()
}

// queueBackups moves the held entries to the queue, in step order; c.mu is
// held.
func (c *committer) queueBackups() {
	steps := make([]int, 0, len(c.backup))
	for s := range c.backup {
		steps = append(steps, s)
	}
	slices.Sort(steps)
	for _, s := range steps {
		c.queue = append(c.queue, record{key: job.LedgerKey(s), value: c.backup[s], create: true})
	}
	clear(c.backup)
	c.added = 0
}

func (c *committer) run() {
	defer close(c.stopped)
	failures := 0
	for {
		c.mu.Lock()
		for !c.closed && !c.writable() && !c.trimNow {
			c.cond.Wait()
		}
		if c.trimNow && !c.closed {
			c.trimNow = false
			lo, hi := c.backupSpan()
			c.mu.Unlock()
			c.trim(lo, hi)
			continue
		}
		if !c.writable() { // closed, with nothing that can still be written
			c.mu.Unlock()
			return
		}
		batch := c.queue[:len(c.queue):len(c.queue)] // appends during the write go to a new array
		fence := c.fence
		c.busy = true
		c.mu.Unlock()
		fenced, err := c.write(batch, fence)
		c.mu.Lock()
		c.busy = false
		switch {
		case err != nil:
			failures++
		case fenced:
			if c.fence == fence {
				c.stale = true // wait for a new fence
			}
		default:
			c.queue = c.queue[len(batch):]
			failures = 0
		}
		closed := c.closed
		c.cond.Broadcast()
		c.mu.Unlock()
		if fenced {
			c.log.Info("the ring changed: writes wait for the next ring this worker is a member of", "queued", len(batch))
		}
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

// writable says a batch can be written now; c.mu is held.
func (c *committer) writable() bool { return len(c.queue) > 0 && c.fence != 0 && !c.stale }

// write commits batch in transactions fenced on the ring's mod revision;
// fenced is true when the ring had moved on (nothing of that transaction
// was written).
func (c *committer) write(batch []record, fence int64) (fenced bool, err error) {
	// etcd refuses a transaction that names a key twice, and progress and
	// stats records repeat: keep each key's newest value, at its newest
	// position (so done stays last).
	last := make(map[string]int, len(batch))
	for i, r := range batch {
		last[r.key] = i
	}
	ops := make([]clientv3.Op, 0, len(last))
	for i, r := range batch {
		if last[r.key] != i {
			continue
		}
		k := c.prefix + r.key
		if r.create {
			ops = append(ops, clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(k), "=", 0)},
				[]clientv3.Op{clientv3.OpPut(k, r.value)}, nil))
		} else {
			ops = append(ops, clientv3.OpPut(k, r.value))
		}
	}
	// A short deadline: a write caught by an etcd outage is retried with
	// everything queued meanwhile instead of landing late with a stale
	// batch (progress would then lag the workers after the outage).
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for i := 0; i < len(ops); i += 64 { // etcd caps ops per txn
		resp, err := c.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(c.ringKey), "=", fence)).
			Then(ops[i:min(i+64, len(ops))]...).Commit()
		if err != nil {
			return false, fmt.Errorf("worker: commit: %w", err)
		}
		if !resp.Succeeded {
			return true, nil
		}
	}
	return false, nil
}

// backupSpan is the range of steps held as backups; c.mu is held.
func (c *committer) backupSpan() (lo, hi int) {
	lo, hi = -1, -1
	for s := range c.backup {
		if lo < 0 || s < lo {
			lo = s
		}
		hi = max(hi, s)
	}
	return lo, hi
}

// trim drops the backups of steps lo..hi that etcd has (a keys-only read).
func (c *committer) trim(lo, hi int) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	resp, err := c.cli.Get(ctx, c.prefix+job.LedgerKey(lo), clientv3.WithRange(c.prefix+job.LedgerKey(hi+1)), clientv3.WithKeysOnly())
	if err != nil {
		return // kept: the next trim, or the next ring, writes them
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, kv := range resp.Kvs {
		var s int
		if _, err := fmt.Sscanf(strings.TrimPrefix(string(kv.Key), c.prefix+job.KeyLedger), "%d", &s); err == nil {
			delete(c.backup, s)
		}
	}
}

// flush waits until everything queued so far is in etcd (nil), the writes
// are fenced off (ErrFenced: this worker's ring is no longer the current
// one), or ctx ends.
func (c *committer) flush(ctx context.Context) error {
	done := make(chan error, 1)
	go func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		for (len(c.queue) > 0 || c.busy) && ctx.Err() == nil {
			if !c.busy && (c.stale || c.fence == 0) {
				done <- ErrFenced
				return
			}
			c.cond.Wait()
		}
		done <- ctx.Err()
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		c.cond.Broadcast()
		return ctx.Err()
	}
}

// currentFence is the ring revision writes are fenced on now, 0 if none
// (not a member of a ring, or the ring moved past the fence).
func (c *committer) currentFence() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stale {
		return 0
	}
	return c.fence
}

// close writes the backups still held (under the current fence) and what is
// queued, giving up after 10 s.
func (c *committer) close() {
	c.mu.Lock()
	if !c.closed {
		if c.fence != 0 && !c.stale {
			c.queueBackups()
		}
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
//
// Every etcd write of a checkpoint (the manifest, checkpoints/latest, the
// deletes of pruning) is a transaction that holds only while the ring
// record's mod revision is the fence the checkpoint was started under (the
// ring whose step it is; the committer's), and the manifest's only while
// checkpoints/latest still has the mod revision read just before, whose
// step must not be newer than the checkpoint's: a rank 0 whose ring was
// superseded commits nothing (ErrFenced), and latest never moves back
// (ErrBehindLatest). A refused checkpoint is logged and dropped; what is
// committed stays as it is.
//
// Before writing, a fenced read checks that the ring is still current (a
// stale rank 0 that can still reach etcd writes no files) and whether the
// step is committed already. The files go to a directory of this write's
// own (checkpoint.SaveFresh): a step-N left by a stale rank 0 that never
// committed it is neither reused nor removed, and the manifest names the
// attempt directory written instead.
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

// start checkpoints the model's state, a step of the ring of epoch, in the
// background, fenced on the ring the worker's writes are fenced on now.
func (c *checkpointer) start(epoch uint64, val float64) {
	c.mu.Lock()
	if c.running {
		c.mu.Unlock()
		c.w.log.Warn("previous checkpoint still writing; skipping this one", "step", c.w.eng.Step)
		return
	}
	c.running = true
	c.mu.Unlock()
	w := c.w
	var fence int64
	if w.commits != nil {
		fence = w.commits.currentFence()
	}
	// The snapshot is float32, as the model holds it: 12 bytes per
	// parameter of host memory for weights and moments together.
	ck, err := w.eng.Snapshot(w.job, val)
	if err != nil {
		c.mu.Lock()
		c.running = false
		c.mu.Unlock()
		w.log.Warn("checkpoint failed", "step", w.eng.Step, "error", err)
		return
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		defer func() { c.mu.Lock(); c.running = false; c.mu.Unlock() }()
		step := ck.State.DataStep
		err := c.save(context.Background(), ck, epoch, fence)
		switch {
		case errors.Is(err, errCommitted):
			// An epoch that starts at an evaluation step evaluates it again
			// (state.go), and rank 0 then checkpoints it again.
			w.log.Info("checkpoint of this step already committed", "step", step)
		case errors.Is(err, ErrFenced), errors.Is(err, ErrBehindLatest):
			w.log.Warn("checkpoint refused", "step", step, "epoch", epoch, "ring_revision", fence, "error", err)
		case err != nil:
			w.log.Warn("checkpoint failed", "step", step, "error", err)
		}
	}()
}

func (c *checkpointer) wait() { c.wg.Wait() }

// save writes ck and commits its manifest (see checkpointer); errCommitted
// if the step's checkpoint is committed already. Its etcd requests stop
// when ctx ends.
func (c *checkpointer) save(ctx context.Context, ck checkpoint.Checkpoint, epoch uint64, fence int64) error {
	w := c.w
	step := ck.State.DataStep
	if fence == 0 {
		return fmt.Errorf("worker: checkpoint of step %d (epoch %d): %w", step, epoch, ErrFenced)
	}
	t0 := time.Now()
	var kvs []*mvccpb.KeyValue
	err := retryEtcd(ctx, func(ctx context.Context) (err error) {
		kvs, err = c.readFenced(ctx, fence, job.CheckpointKey(step), job.KeyLatestCkpt)
		return err
	})
	if err != nil {
		return fmt.Errorf("worker: checkpoint of step %d (epoch %d): %w", step, epoch, err)
	}
	if kv := kvs[0]; kv != nil {
		var man job.Manifest
		if job.Decode(string(kv.Key), kv.Value, &man) == nil {
			if dir, err := checkpoint.DirOf(w.job.CheckpointDir, man.Dir, step); err == nil {
				if _, err := os.Stat(dir); err == nil {
					return errCommitted
				}
			}
		}
	}
	if latest := latestStep(kvs[1]); step < latest {
		return fmt.Errorf("worker: checkpoint of step %d (epoch %d): latest is step %d: %w", step, epoch, latest, ErrBehindLatest)
	}
	saved, err := checkpoint.SaveFresh(w.job.CheckpointDir, ck)
	if err != nil {
		return err
	}
	man := job.Manifest{Step: saved.Step, Epoch: epoch, Dir: saved.Dir, Config: saved.Config}
	for _, f := range saved.Files {
		man.Files = append(man.Files, job.File{Name: f.Name, Size: f.Size, SHA256: f.SHA256})
	}
	if err := retryEtcd(ctx, func(ctx context.Context) error { return c.commit(ctx, man, fence) }); err != nil {
		// The directory stays: a refused or failed commit may still have
		// landed (an etcd timeout), and an orphan goes with the next
		// prune past its step.
		return fmt.Errorf("worker: checkpoint %s written but not committed to etcd: %w", saved.Dir, err)
	}
	c.mu.Lock()
	c.last = time.Since(t0)
	c.mu.Unlock()
	c.prune(fence)
	w.log.Info("checkpoint committed", "step", man.Step, "dir", saved.Dir, "duration", time.Since(t0).Round(time.Millisecond))
	return nil
}

// errLatestMoved: checkpoints/latest changed between the read and the
// transaction; read again.
var errLatestMoved = errors.New("worker: checkpoints/latest changed under the commit")

// retryEtcd runs op with a 5 s deadline until it succeeds, fails for good
// (ErrFenced, ErrBehindLatest), has failed 40 times (about 3.5 minutes of
// etcd being unavailable) or ctx ends.
func retryEtcd(ctx context.Context, op func(ctx context.Context) error) error {
	for attempt := 0; ; attempt++ {
		octx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := op(octx)
		cancel()
		if err == nil || errors.Is(err, ErrFenced) || errors.Is(err, ErrBehindLatest) || attempt >= 40 || ctx.Err() != nil {
			return err
		}
		pause := time.NewTimer(250 * time.Millisecond)
		select {
		case <-ctx.Done():
			pause.Stop()
			return err
		case <-pause.C:
		}
	}
}

// readFenced reads keys (relative to the job's prefix) in one transaction
// that holds only while the ring record's mod revision is fence; a key
// that does not exist reads as nil.
func (c *checkpointer) readFenced(ctx context.Context, fence int64, keys ...string) ([]*mvccpb.KeyValue, error) {
	w := c.w
	ops := make([]clientv3.Op, len(keys))
	for i, k := range keys {
		ops[i] = clientv3.OpGet(w.key(k))
	}
	resp, err := w.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(w.key(job.KeyRing)), "=", fence)).Then(ops...).Commit()
	if err != nil {
		return nil, fmt.Errorf("worker: read %v: %w", keys, err)
	}
	if !resp.Succeeded {
		return nil, fmt.Errorf("worker: ring revision %d is no longer current: %w", fence, ErrFenced)
	}
	out := make([]*mvccpb.KeyValue, len(keys))
	for i, r := range resp.Responses {
		if kvs := r.GetResponseRange().Kvs; len(kvs) > 0 {
			out[i] = kvs[0]
		}
	}
	return out, nil
}

// latestStep is the step checkpoints/latest names, -1 if none (a value
// that is not a step does not hold back a checkpoint: it is overwritten).
func latestStep(kv *mvccpb.KeyValue) int {
	if kv == nil {
		return -1
	}
	n, err := strconv.Atoi(string(kv.Value))
	if err != nil {
		return -1
	}
	return n
}

// commit puts man and moves checkpoints/latest to its step in one
// transaction that holds only while the ring is at fence and latest is
// as read here, not past man's step.
func (c *checkpointer) commit(ctx context.Context, man job.Manifest, fence int64) error {
	w := c.w
	kvs, err := c.readFenced(ctx, fence, job.KeyLatestCkpt)
	if err != nil {
		return err
	}
	var rev int64
	if kvs[0] != nil {
		rev = kvs[0].ModRevision
	}
	if latest := latestStep(kvs[0]); man.Step < latest {
		return fmt.Errorf("worker: commit checkpoint of step %d: latest is step %d: %w", man.Step, latest, ErrBehindLatest)
	}
	ring, latestKey := w.key(job.KeyRing), w.key(job.KeyLatestCkpt)
	resp, err := w.cli.Txn(ctx).If(
		clientv3.Compare(clientv3.ModRevision(ring), "=", fence),
		clientv3.Compare(clientv3.ModRevision(latestKey), "=", rev),
	).Then(
		clientv3.OpPut(w.key(job.CheckpointKey(man.Step)), job.Encode(man)),
		clientv3.OpPut(latestKey, strconv.Itoa(man.Step)),
	).Else(clientv3.OpGet(ring)).Commit()
	if err != nil {
		return fmt.Errorf("worker: commit checkpoint of step %d: %w", man.Step, err)
	}
	if resp.Succeeded {
		return nil
	}
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) == 0 || kvs[0].ModRevision != fence {
		return fmt.Errorf("worker: commit checkpoint of step %d: ring revision %d is no longer current: %w", man.Step, fence, ErrFenced)
	}
	return errLatestMoved
}

// prune keeps the job's newest keep_checkpoints committed checkpoints: the
// older manifests leave etcd first (in transactions fenced like the
// commit), then checkpoint.RemoveOlder removes the step-N directories (and
// attempts) older than the oldest one kept, so a resume never finds a
// manifest without its files. The directories removed are those the
// checkpoint package finds directly under the job's checkpoint_dir, never
// what a manifest in etcd names.
func (c *checkpointer) prune(fence int64) {
	w := c.w
	keep := w.job.KeepCheckpoints
	if keep <= 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := w.cli.Get(ctx, w.key(job.KeyCheckpoints), clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend))
	if err != nil {
		return // next time
	}
	n, oldestKept := 0, -1
	var old []clientv3.Op
	for _, kv := range resp.Kvs {
		if string(kv.Key) == w.key(job.KeyLatestCkpt) {
			continue
		}
		step, err := strconv.Atoi(strings.TrimPrefix(string(kv.Key), w.key(job.KeyCheckpoints)))
		if err != nil {
			continue // not a checkpoint record
		}
		if n++; n <= keep {
			oldestKept = step
			continue
		}
		old = append(old, clientv3.OpDelete(string(kv.Key)))
	}
	if oldestKept < 0 {
		return
	}
	for i := 0; i < len(old); i += 64 { // etcd caps ops per txn
		resp, err := w.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(w.key(job.KeyRing)), "=", fence)).
			Then(old[i:min(i+64, len(old))]...).Commit()
		if err != nil || !resp.Succeeded {
			return // fenced off (the next ring's rank 0 prunes) or next time
		}
	}
	if _, err := checkpoint.RemoveOlder(w.job.CheckpointDir, oldestKept); err != nil {
		w.log.Warn("could not remove old checkpoints", "error", err)
	}
}

// resume loads the newest committed checkpoint whose files match the
// manifest committed to etcd, falling back to older ones with a warning
// (a joining worker starts here too, then takes the ring's state). A
// manifest is only ever read from the job's checkpoint_dir: one naming
// anything but a directory of its step there (checkpoint.DirOf) is refused.
func (w *worker) resume(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := w.cli.Get(ctx, w.key(job.KeyCheckpoints), clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend))
	if err != nil {
		return fmt.Errorf("worker: read checkpoint manifests: %w", err)
	}
	for _, kv := range resp.Kvs {
		if string(kv.Key) == w.key(job.KeyLatestCkpt) {
			continue
		}
		var man job.Manifest
		if err := job.Decode(string(kv.Key), kv.Value, &man); err != nil {
			w.log.Warn("skipping checkpoint", "key", string(kv.Key), "error", err)
			continue
		}
		dir, err := checkpoint.DirOf(w.job.CheckpointDir, man.Dir, man.Step)
		if err != nil {
			w.log.Warn("skipping checkpoint: its manifest names a directory outside checkpoint_dir",
				"key", string(kv.Key), "manifest_dir", man.Dir, "error", err)
			continue
		}
		files := make([]checkpoint.File, len(man.Files))
		for i, f := range man.Files {
			files[i] = checkpoint.File{Name: f.Name, Size: f.Size, SHA256: f.SHA256}
		}
		ck, err := checkpoint.LoadWith(dir, checkpoint.Manifest{Step: man.Step, Config: man.Config, Files: files})
		if err != nil {
			w.setAside(dir, err)
			continue
		}
		if a, b := model.ConfigMetadata(ck.Config)[model.ConfigKey], model.ConfigMetadata(w.eng.M.Cfg)[model.ConfigKey]; a != b {
			return fmt.Errorf("worker: checkpoint %s has another model config than the job", dir)
		}
		if err := w.eng.M.SetParamsF32(ck.Params); err != nil {
			return err
		}
		if err := w.eng.Opt.SetMomentsF32(ck.M, ck.V, ck.State.OptimizerStep); err != nil {
			return err
		}
		w.eng.Step, w.eng.Skipped = ck.State.DataStep, ck.State.Skipped
		w.log.Info("resumed from checkpoint", "dir", dir, "step", w.eng.Step)
		return nil
	}
	return nil
}

// setAside warns about a damaged checkpoint and sets its directory aside
// (kept for inspection) so the step can be checkpointed again. Another
// worker sharing the directory may have set it aside first.
func (w *worker) setAside(dir string, err error) {
	aside, aerr := checkpoint.SetAside(dir)
	w.log.Warn("skipping checkpoint", "dir", dir, "error", err, "moved_to", aside)
	if aerr != nil {
		w.log.Warn("could not set the damaged checkpoint aside", "dir", dir, "error", aerr)
	}
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
