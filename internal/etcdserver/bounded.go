package etcdserver

import (
	"context"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// DefaultCallTimeout bounds one etcd request made without a deadline of its
// own (ClientConfig.CallTimeout overrides it).
//
// etcd's client waits for a ready connection before sending a request, and
// retries a read while the server is unreachable; with a context that has
// no deadline, a Get against an etcd that is gone never returns. Every
// client this package makes therefore gives each unary request a deadline:
// the caller's if it has one, else this. Watches and lease keep-alives are
// streams that live as long as their context, and are left alone.
const DefaultCallTimeout = 5 * time.Second

// Bound makes every unary KV and lease request of cli carry a deadline:
// requests whose context has none get d (DefaultCallTimeout when d is 0).
// Connect applies it; call it on a client made some other way.
func Bound(cli *clientv3.Client, d time.Duration) *clientv3.Client {
	if d <= 0 {
		d = DefaultCallTimeout
	}
	if _, ok := cli.KV.(boundedKV); !ok {
		cli.KV = boundedKV{kv: cli.KV, d: d}
	}
	if _, ok := cli.Lease.(boundedLease); !ok {
		cli.Lease = boundedLease{Lease: cli.Lease, d: d}
	}
	return cli
}

// withDeadline returns ctx when it has a deadline, else ctx bounded by d.
func withDeadline(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, d)
}

type boundedKV struct {
	kv clientv3.KV
	d  time.Duration
}

func (b boundedKV) Put(ctx context.Context, key, val string, opts ...clientv3.OpOption) (*clientv3.PutResponse, error) {
	ctx, cancel := withDeadline(ctx, b.d)
	defer cancel()
	return b.kv.Put(ctx, key, val, opts...)
}

func (b boundedKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	ctx, cancel := withDeadline(ctx, b.d)
	defer cancel()
	return b.kv.Get(ctx, key, opts...)
}

// GetStream is a stream: it lives as long as ctx.
func (b boundedKV) GetStream(ctx context.Context, key string, opts ...clientv3.OpOption) (clientv3.GetStreamChan, error) {
	return b.kv.GetStream(ctx, key, opts...)
}

func (b boundedKV) Delete(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.DeleteResponse, error) {
	ctx, cancel := withDeadline(ctx, b.d)
	defer cancel()
	return b.kv.Delete(ctx, key, opts...)
}

func (b boundedKV) Compact(ctx context.Context, rev int64, opts ...clientv3.CompactOption) (*clientv3.CompactResponse, error) {
	ctx, cancel := withDeadline(ctx, b.d)
	defer cancel()
	return b.kv.Compact(ctx, rev, opts...)
}

func (b boundedKV) Do(ctx context.Context, op clientv3.Op) (clientv3.OpResponse, error) {
	ctx, cancel := withDeadline(ctx, b.d)
	defer cancel()
	return b.kv.Do(ctx, op)
}

// Txn's context is used when the transaction commits: the deadline runs
// from Txn, and Commit releases it.
func (b boundedKV) Txn(ctx context.Context) clientv3.Txn {
	ctx, cancel := withDeadline(ctx, b.d)
	return &boundedTxn{txn: b.kv.Txn(ctx), cancel: cancel}
}

type boundedTxn struct {
	txn    clientv3.Txn
	cancel context.CancelFunc
}

func (t *boundedTxn) If(cs ...clientv3.Cmp) clientv3.Txn   { t.txn = t.txn.If(cs...); return t }
func (t *boundedTxn) Then(ops ...clientv3.Op) clientv3.Txn { t.txn = t.txn.Then(ops...); return t }
func (t *boundedTxn) Else(ops ...clientv3.Op) clientv3.Txn { t.txn = t.txn.Else(ops...); return t }
func (t *boundedTxn) Commit() (*clientv3.TxnResponse, error) {
	defer t.cancel()
	return t.txn.Commit()
}

// boundedLease bounds the lease's unary requests; KeepAlive (a stream) and
// Close pass through.
type boundedLease struct {
	clientv3.Lease
	d time.Duration
}

func (b boundedLease) Grant(ctx context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error) {
	ctx, cancel := withDeadline(ctx, b.d)
	defer cancel()
	return b.Lease.Grant(ctx, ttl)
}

func (b boundedLease) Revoke(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseRevokeResponse, error) {
	ctx, cancel := withDeadline(ctx, b.d)
	defer cancel()
	return b.Lease.Revoke(ctx, id)
}

func (b boundedLease) TimeToLive(ctx context.Context, id clientv3.LeaseID, opts ...clientv3.LeaseOption) (*clientv3.LeaseTimeToLiveResponse, error) {
	ctx, cancel := withDeadline(ctx, b.d)
	defer cancel()
	return b.Lease.TimeToLive(ctx, id, opts...)
}

func (b boundedLease) Leases(ctx context.Context) (*clientv3.LeaseLeasesResponse, error) {
	ctx, cancel := withDeadline(ctx, b.d)
	defer cancel()
	return b.Lease.Leases(ctx)
}

func (b boundedLease) KeepAliveOnce(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseKeepAliveResponse, error) {
	ctx, cancel := withDeadline(ctx, b.d)
	defer cancel()
	return b.Lease.KeepAliveOnce(ctx, id)
}
