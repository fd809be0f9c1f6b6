package worker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
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

// errFenced says queued writes cannot land: this worker is not a member of
// the current ring.
var errFenced = errors.New("worker: not a member of the current ring: writes are fenced off")

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
// are fenced off (errFenced: this worker's ring is no longer the current
// one), or ctx ends.
func (c *committer) flush(ctx context.Context) error {
	done := make(chan error, 1)
	go func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		for (len(c.queue) > 0 || c.busy) && ctx.Err() == nil {
			if !c.busy && (c.stale || c.fence == 0) {
				done <- errFenced
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
		c.w.log.Warn("previous checkpoint still writing; skipping this one", "step", c.w.eng.Step)
		return
	}
	c.running = true
	c.mu.Unlock()
	w := c.w
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
		t0 := time.Now()
		saved, err := checkpoint.Save(w.job.CheckpointDir, ck)
		if errors.Is(err, checkpoint.ErrExists) {
			// An epoch that starts at an evaluation step evaluates it again
			// (state.go), and rank 0 then checkpoints it again.
			w.log.Info("checkpoint of this step already written", "step", ck.State.DataStep)
			return
		}
		if err != nil {
			w.log.Warn("checkpoint failed", "step", ck.State.DataStep, "error", err)
			return
		}
		man := job.Manifest{Step: saved.Step, Epoch: epoch, Dir: saved.Dir, Config: saved.Config}
		for _, f := range saved.Files {
			man.Files = append(man.Files, job.File{Name: f.Name, Size: f.Size, SHA256: f.SHA256})
		}
		for attempt := 0; ; attempt++ {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, err = w.cli.Txn(ctx).Then(
				clientv3.OpPut(w.key(job.CheckpointKey(man.Step)), job.Encode(man)),
				clientv3.OpPut(w.key(job.KeyLatestCkpt), strconv.Itoa(man.Step)),
			).Commit()
			cancel()
			if err == nil || attempt > 40 {
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
		if err != nil {
			w.log.Warn("checkpoint written but not committed to etcd", "dir", saved.Dir, "error", err)
			return
		}
		c.mu.Lock()
		c.last = time.Since(t0)
		c.mu.Unlock()
		c.prune()
		w.log.Info("checkpoint committed", "step", man.Step, "dir", saved.Dir, "duration", time.Since(t0).Round(time.Millisecond))
	}()
}

func (c *checkpointer) wait() { c.wg.Wait() }

// prune keeps the job's newest keep_checkpoints committed checkpoints: the
// older manifests leave etcd first, then checkpoint.RemoveOlder removes the
// step-N directories older than the oldest one kept, so a resume never
// finds a manifest without its files. The directories removed are those
// the checkpoint package finds directly under the job's checkpoint_dir,
// never what a manifest in etcd names.
func (c *checkpointer) prune() {
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
		if _, err := w.cli.Delete(ctx, string(kv.Key)); err != nil {
			return
		}
	}
	if oldestKept < 0 {
		return
	}
	if _, err := checkpoint.RemoveOlder(w.job.CheckpointDir, oldestKept); err != nil {
		w.log.Warn("could not remove old checkpoints", "error", err)
	}
}

// resume loads the newest committed checkpoint whose files match the
// manifest committed to etcd, falling back to older ones with a warning
// (a joining worker starts here too, then takes the ring's state). A
// manifest is only ever read from the job's checkpoint_dir: one naming
// another directory is refused.
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
		dir := checkpoint.StepDir(w.job.CheckpointDir, man.Step)
		if !sameDir(man.Dir, dir) {
			w.log.Warn("skipping checkpoint: its manifest names a directory outside checkpoint_dir",
				"key", string(kv.Key), "manifest_dir", man.Dir, "want", dir)
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

// sameDir reports whether a and b name the same path (relative paths are
// taken from the working directory, as the writer's were).
func sameDir(a, b string) bool {
	a, errA := filepath.Abs(a)
	b, errB := filepath.Abs(b)
	return errA == nil && errB == nil && a == b
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
