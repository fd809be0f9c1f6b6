package worker

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/internal/etcdtest"
	"github.com/bmojo/bmojo/job"
)

// TestCommitterRepeatedKeys: progress and stats records repeat between
// flushes; etcd refuses a transaction naming a key twice, so a batch must
// carry each key once, with its newest value (robustness bug 4).
func TestCommitterRepeatedKeys(t *testing.T) {
	ctx, cli, c := startCommitter(t)
	// Many records added faster than one transaction: batches hold repeats.
	for step := range 300 {
		c.addLedger(step, fmt.Sprintf(`{"step":%d}`, step), true)
		c.add(job.KeyProgress, fmt.Sprintf(`{"step":%d}`, step+1))
		c.add(job.KeyStats+"w0", fmt.Sprintf(`{"step":%d}`, step+1))
	}
	c.add(job.KeyDone, `{"step":300}`)
	fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
	err := c.flush(fctx)
	fcancel()
	if err != nil {
		t.Fatalf("flush did not finish (a batch is being refused): %v", err)
	}
	resp, err := cli.Get(ctx, prefix+job.KeyLedger, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if resp.Count != 300 {
		t.Fatalf("%d ledger entries in etcd, want 300", resp.Count)
	}
	for k, want := range map[string]string{job.KeyProgress: `{"step":300}`, job.KeyStats + "w0": `{"step":300}`, job.KeyDone: `{"step":300}`} {
		r, err := cli.Get(ctx, prefix+k)
		if err != nil || len(r.Kvs) != 1 || string(r.Kvs[0].Value) != want {
			t.Fatalf("%s: got %v (err %v), want %s", k, r.Kvs, err, want)
		}
	}
}

// prefix is the test job's etcd prefix.
const prefix = "/bmojo/jobs/t/"

// startCommitter starts an etcd, a committer of the test job fenced on its
// ring of epoch 1, and a context that bounds the test.
func startCommitter(t *testing.T) (context.Context, *clientv3.Client, *committer) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	cli := etcdtest.Start(t)
	c := newCommitter(cli, prefix, hclog.NewNullLogger())
	t.Cleanup(c.close)
	c.setFence(putRing(ctx, t, cli, 1))
	return ctx, cli, c
}

// putRing writes a ring record of epoch and returns its mod revision (what
// a member's writes are fenced on).
func putRing(ctx context.Context, t *testing.T, cli *clientv3.Client, epoch uint64) int64 {
	t.Helper()
	resp, err := cli.Put(ctx, prefix+job.KeyRing, job.Encode(job.Ring{Epoch: epoch}))
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

// ledgerSteps returns the steps etcd holds ledger entries for, and their
// values.
func ledgerSteps(ctx context.Context, t *testing.T, cli *clientv3.Client) map[string]string {
	t.Helper()
	resp, err := cli.Get(ctx, prefix+job.KeyLedger, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, kv := range resp.Kvs {
		out[strings.TrimPrefix(string(kv.Key), prefix+job.KeyLedger)] = string(kv.Value)
	}
	return out
}

// TestCommitterFenced: a worker's writes hold only while the ring it is a
// member of is the current one. Once the ring moves on, nothing lands
// (flush says so) until the worker is fenced on a ring again; then the
// queue lands, and a ledger entry that exists is never rewritten.
func TestCommitterFenced(t *testing.T) {
	ctx, cli, c := startCommitter(t)
	c.addLedger(0, `{"step":0,"epoch":1}`, true)
	if err := c.flush(ctx); err != nil {
		t.Fatal(err)
	}
	next := putRing(ctx, t, cli, 2) // a ring this worker has not entered
	c.addLedger(1, `{"step":1,"epoch":1}`, true)
	c.add(job.KeyProgress, `{"step":2}`)
	if err := c.flush(ctx); !errors.Is(err, ErrFenced) {
		t.Fatalf("flush under a stale ring: %v, want %v", err, ErrFenced)
	}
	if got := ledgerSteps(ctx, t, cli); len(got) != 1 {
		t.Fatalf("a stale ring's writes landed: %v", got)
	}
	if r, err := cli.Get(ctx, prefix+job.KeyProgress); err != nil || len(r.Kvs) != 0 {
		t.Fatalf("a stale ring's progress landed: %v (err %v)", r.Kvs, err)
	}
	// Another member committed step 0 differently meanwhile: it stands.
	if _, err := cli.Put(ctx, prefix+job.LedgerKey(0), `{"step":0,"epoch":2}`); err != nil {
		t.Fatal(err)
	}
	c.setFence(next) // the worker entered the new ring
	c.addLedger(0, `{"step":0,"epoch":3}`, true)
	if err := c.flush(ctx); err != nil {
		t.Fatal(err)
	}
	got := ledgerSteps(ctx, t, cli)
	if want := map[string]string{"0000000000": `{"step":0,"epoch":2}`, "0000000001": `{"step":1,"epoch":1}`}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("ledger %v, want %v", got, want)
	}
}

// TestCommitterBackups: a member that is not rank 0 keeps the entries it
// holds and writes those still missing when its ring changes (rank 0 may
// have died with them unwritten) or when it closes; every backupTrim
// entries it drops those etcd has.
func TestCommitterBackups(t *testing.T) {
	ctx, cli, c := startCommitter(t)
	// Rank 0 commits steps 0 and 1 and dies before step 2's entry lands.
	for s := range 2 {
		if _, err := cli.Put(ctx, prefix+job.LedgerKey(s), fmt.Sprintf(`{"step":%d,"writer":"rank0"}`, s)); err != nil {
			t.Fatal(err)
		}
	}
	for s := range 3 {
		c.addLedger(s, fmt.Sprintf(`{"step":%d,"writer":"rank1"}`, s), false)
	}
	if err := c.flush(ctx); err != nil {
		t.Fatal(err)
	}
	if got := ledgerSteps(ctx, t, cli); len(got) != 2 {
		t.Fatalf("backups were written while the ring stood: %v", got)
	}
	c.setFence(putRing(ctx, t, cli, 2))
	if err := c.flush(ctx); err != nil {
		t.Fatal(err)
	}
	got := ledgerSteps(ctx, t, cli)
	if len(got) != 3 || !strings.Contains(got["0000000000"], "rank0") || !strings.Contains(got["0000000002"], "rank1") {
		t.Fatalf("after the ring changed: %v, want rank 0's steps 0 and 1 and the backup of step 2", got)
	}
	// Trim: of backupTrim held entries, those etcd has are dropped.
	for s := 3; s < 3+backupTrim; s++ {
		if s%2 == 0 {
			if _, err := cli.Put(ctx, prefix+job.LedgerKey(s), `{}`); err != nil {
				t.Fatal(err)
			}
		}
		c.addLedger(s, `{}`, false)
	}
	waitUntil(ctx, t, "the trim", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.backup) == backupTrim/2
	})
	c.close()
	if got := ledgerSteps(ctx, t, cli); len(got) != 3+backupTrim {
		t.Fatalf("after close: %d entries, want %d", len(got), 3+backupTrim)
	}
}

// waitUntil polls cond every 10 ms until it holds or ctx ends (a failure).
func waitUntil(ctx context.Context, t *testing.T, what string, cond func() bool) {
	t.Helper()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("timed out waiting for %s", what)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// TestWindowChecksum: the checksum a worker reports is FNV-1a 64 over each
// window's seqLen+1 tokens as 4-byte little-endian integers (job.Consumed),
// the definition the robustness suite checks against with hash/fnv.
func TestWindowChecksum(t *testing.T) {
	const T, count = 5, 3
	windows := make([][]int32, count)
	var tokens, targets []int32
	for k := range windows {
		for i := range T + 1 {
			windows[k] = append(windows[k], int32(k*1000+i*37-70000))
		}
		tokens = append(tokens, windows[k][:T]...)
		targets = append(targets, windows[k][1:]...)
	}
	h := fnv.New64a()
	for _, w := range windows {
		for _, v := range w {
			h.Write(binary.LittleEndian.AppendUint32(nil, uint32(v)))
		}
	}
	if got, want := windowChecksum(tokens, targets, count), h.Sum64(); got != want {
		t.Fatalf("windowChecksum = %016x, FNV-1a 64 of the windows = %016x", got, want)
	}
	targets[len(targets)-1]++ // the last window's last token
	if windowChecksum(tokens, targets, count) == h.Sum64() {
		t.Fatal("the checksum ignores a window's last token")
	}
}
