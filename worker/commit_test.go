package worker

import (
	"context"
	"fmt"
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cli := etcdtest.Start(t)
	const prefix = "/bmojo/jobs/t/"
	c := newCommitter(cli, prefix, hclog.NewNullLogger())
	defer c.close()
	// Many records added faster than one transaction: batches hold repeats.
	for step := range 300 {
		c.add(job.LedgerKey(step), fmt.Sprintf(`{"step":%d}`, step))
		c.add(job.KeyProgress, fmt.Sprintf(`{"step":%d}`, step+1))
		c.add(job.KeyStats+"w0", fmt.Sprintf(`{"step":%d}`, step+1))
	}
	c.add(job.KeyDone, `{"step":300}`)
	fctx, fcancel := context.WithTimeout(ctx, 10*time.Second)
	c.flush(fctx)
	timedOut := fctx.Err() != nil
	fcancel()
	if timedOut {
		t.Fatal("flush did not finish: a batch is being refused")
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
