package coordinator

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/bmojo/bmojo/internal/etcdserver"
	"github.com/bmojo/bmojo/job"
)

// Config configures one coordinator replica.
type Config struct {
	// JobName selects the job's keys, job.Prefix(JobName). Required.
	JobName string
	// Etcd is how to reach etcd (ignored when Client is set).
	Etcd etcdserver.ClientConfig
	// Client, when set, is used instead of connecting with Etcd; Run does
	// not close it. For `bmojo train`, which already holds one, and tests.
	Client *clientv3.Client
	// ID names this replica in the election value and logs.
	// Default: hostname-pid.
	ID string
	// ReadyTimeout is how long the members of a new ring have to write
	// ready before the unready ones are dropped. Default
	// job.DefaultReadyGrace seconds.
	ReadyTimeout time.Duration
	// BootstrapTimeout is how long the first ring waits for JobSpec.Workers
	// members after the first one registered, before starting with fewer
	// (at least JobSpec.MinRing). Default 10 s.
	BootstrapTimeout time.Duration
	// LeaseTTL is the TTL of this replica's election lease: how long a
	// crashed leader blocks a standby. Whole seconds, at least 1.
	// Default job.DefaultLeaseTTL seconds.
	LeaseTTL time.Duration
	// Debounce batches events: the first event of a quiet period is
	// acted on this long after it arrives, with all that came meanwhile.
	// Default 100 ms.
	Debounce time.Duration
	// MaxBackoff caps the wait between retries while etcd is unavailable.
	// Default 2 s.
	MaxBackoff time.Duration
	// Logger is the parent logger. Default: hclog.NewNullLogger.
	Logger hclog.Logger
}

// Default returns a Config with every default set and no job.
func Default() Config {
	return Config{
		ReadyTimeout:     job.DefaultReadyGrace * time.Second,
		BootstrapTimeout: 10 * time.Second,
		LeaseTTL:         job.DefaultLeaseTTL * time.Second,
		Debounce:         100 * time.Millisecond,
		MaxBackoff:       2 * time.Second,
	}
}

// Validate checks the config without side effects; the error names the
// flag of the bad field.
func (c Config) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrBadConfig, fmt.Sprintf(format, args...))
	}
	switch {
	case c.JobName == "" || strings.ContainsAny(c.JobName, "/ \t\n"):
		return bad("JobName (--job) is %q: want a non-empty name without '/' or spaces", c.JobName)
	case c.ReadyTimeout <= 0:
		return bad("ReadyTimeout (--ready-timeout) is %s, want > 0", c.ReadyTimeout)
	case c.BootstrapTimeout <= 0:
		return bad("BootstrapTimeout (--bootstrap-timeout) is %s, want > 0", c.BootstrapTimeout)
	case c.LeaseTTL < time.Second:
		return bad("LeaseTTL (--lease-ttl) is %s, want at least 1s", c.LeaseTTL)
	case c.Debounce < 0:
		return bad("Debounce is %s, want >= 0", c.Debounce)
	case c.MaxBackoff <= 0:
		return bad("MaxBackoff is %s, want > 0", c.MaxBackoff)
	}
	if c.Client == nil {
		if err := c.Etcd.Validate(); err != nil {
			return fmt.Errorf("%w: %w", ErrBadConfig, err)
		}
	}
	return nil
}

// Record is one membership event, for logs and the dashboard.
type Record struct {
	Time     time.Time
	Kind     string // a Notice kind, or "ring", "started"
	WorkerID string
	Epoch    uint64
	Reason   string
	Recovery time.Duration // on started: membership change -> start published
}

const maxRecords = 1000

// Coordinator is one replica. Run it once.
type Coordinator struct {
	cfg    Config
	log    hclog.Logger
	prefix string

	mu      sync.Mutex
	records []Record
	leader  bool
}

// New checks cfg and returns a replica ready to Run.
func New(cfg Config) (*Coordinator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.ID == "" {
		host, _ := os.Hostname()
		cfg.ID = host + "-" + strconv.Itoa(os.Getpid())
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	return &Coordinator{cfg: cfg, log: cfg.Logger.With("job", cfg.JobName, "replica", cfg.ID), prefix: job.Prefix(cfg.JobName)}, nil
}

// Run is New(cfg) then Run(ctx).
func Run(ctx context.Context, cfg Config) error {
	c, err := New(cfg)
	if err != nil {
		return err
	}
	return c.Run(ctx)
}

// Events returns the membership events seen while leading, oldest first
// (the last 1000).
func (c *Coordinator) Events() []Record {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Record(nil), c.records...)
}

// IsLeader reports whether this replica leads now.
func (c *Coordinator) IsLeader() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.leader
}

func (c *Coordinator) record(r Record) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.records) == maxRecords {
		c.records = append(c.records[:0], c.records[1:]...)
	}
	c.records = append(c.records, r)
}

func (c *Coordinator) setLeader(b bool) {
	c.mu.Lock()
	c.leader = b
	c.mu.Unlock()
}

// Run campaigns for leadership of the job and, while leading, drives the
// membership state machine. It returns nil when the job's done key exists,
// ctx's error when ctx ends, and an error at once only for a bad config or
// job spec. etcd being unavailable is never an error: Run retries.
func (c *Coordinator) Run(ctx context.Context) error {
	cli, release, err := etcdserver.ClientOr(ctx, c.cfg.Client, c.cfg.Etcd, c.log.Named("etcd"))
	if err != nil {
		return fmt.Errorf("coordinator: %w", err)
	}
	defer release()

	var wg sync.WaitGroup
	defer wg.Wait() // after cancel, below
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		if c.waitKey(ctx, cli, c.prefix+job.KeyDone, nil) {
			close(done)
			cancel()
		}
	}()
	finish := func() error {
		select {
		case <-done:
			c.log.Info("job done")
			return nil
		default:
			return ctx.Err()
		}
	}

	var specKV []byte
	c.log.Info("waiting for the job spec")
	if !c.waitKey(ctx, cli, c.prefix+job.KeySpec, &specKV) {
		return finish()
	}
	var spec job.Spec
	if err := job.Decode(job.KeySpec, specKV, &spec); err != nil {
		return fmt.Errorf("%w: %w", ErrBadSpec, err)
	}
	if _, err := NewMachine(spec); err != nil {
		return err
	}
	c.log.Info("campaigning", "workers", spec.Workers, "min_ring", spec.MinRing)

	backoff := c.backoff()
	for ctx.Err() == nil {
		session, err := c.newSession(ctx, cli)
		if err != nil {
			c.log.Warn("cannot open an election session, retrying", "error", err)
			backoff.wait(ctx)
			continue
		}
		election := concurrency.NewElection(session, c.prefix+job.KeyElection)
		if err := c.campaign(ctx, session, election); err != nil {
			c.log.Warn("campaign failed, retrying", "error", err)
			c.closeSession(session)
			backoff.wait(ctx)
			continue
		}
		backoff.reset()
		for ctx.Err() == nil {
			err := c.lead(ctx, cli, session, election, spec)
			if ctx.Err() != nil {
				break
			}
			c.log.Warn("leadership interrupted", "error", err)
			select {
			case <-session.Done():
			default:
				if !errors.Is(err, ErrNotLeader) {
					backoff.wait(ctx)
					continue // still leader: read the state again
				}
			}
			break
		}
		c.setLeader(false)
		rctx, rcancel := context.WithTimeout(context.Background(), time.Second)
		// A standby takes over at once instead of after the lease TTL.
		if err := election.Resign(rctx); err != nil {
			session.Orphan() // etcd is unreachable: let the lease expire rather than wait to revoke it
		} else {
			c.closeSession(session)
		}
		rcancel()
	}
	return finish()
}

// campaign blocks until this replica leads or fails; it also fails when the
// session expires while waiting.
func (c *Coordinator) campaign(ctx context.Context, s *concurrency.Session, e *concurrency.Election) error {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-s.Done():
			cancel()
		case <-cctx.Done():
		}
	}()
	if err := e.Campaign(cctx, c.cfg.ID); err != nil {
		return err
	}
	select {
	case <-s.Done():
		return fmt.Errorf("%w: session expired while campaigning", ErrNotLeader)
	default:
		return nil
	}
}

// newSession grants the election lease under ctx (a Grant under the
// client's context would block through an etcd outage past ctx's end), then
// keeps it alive.
func (c *Coordinator) newSession(ctx context.Context, cli *clientv3.Client) (*concurrency.Session, error) {
	ttl := int(c.cfg.LeaseTTL / time.Second)
	lease, err := cli.Grant(ctx, int64(ttl))
	if err != nil {
		return nil, err
	}
	return concurrency.NewSession(cli, concurrency.WithLease(lease.ID), concurrency.WithTTL(ttl))
}

func (c *Coordinator) closeSession(s *concurrency.Session) {
	// Close revokes the lease, waiting up to its TTL when etcd is down.
	_ = s.Close()
}

// waitKey blocks until key exists (storing its value in val when non-nil)
// and returns true, or returns false when ctx ends. It retries through
// etcd outages.
func (c *Coordinator) waitKey(ctx context.Context, cli *clientv3.Client, key string, val *[]byte) bool {
	backoff := c.backoff()
	for ctx.Err() == nil {
		resp, err := cli.Get(ctx, key)
		if err != nil {
			if ctx.Err() == nil {
				c.log.Warn("cannot read key, retrying", "key", key, "error", err)
			}
			backoff.wait(ctx)
			continue
		}
		if len(resp.Kvs) > 0 {
			if val != nil {
				*val = resp.Kvs[0].Value
			}
			return true
		}
		wctx, cancel := context.WithCancel(ctx)
		for wresp := range cli.Watch(wctx, key, clientv3.WithRev(resp.Header.Revision+1)) {
			if wresp.Err() != nil {
				break
			}
			for _, ev := range wresp.Events {
				if ev.Type == clientv3.EventTypePut {
					if val != nil {
						*val = ev.Kv.Value
					}
					cancel()
					return true
				}
			}
		}
		cancel()
	}
	return false
}

// lead runs the state machine while this replica leads. It returns when
// ctx ends, leadership is lost (ErrNotLeader) or a watch fails.
func (c *Coordinator) lead(ctx context.Context, cli *clientv3.Client, session *concurrency.Session, election *concurrency.Election, spec job.Spec) error {
	// Every etcd call of this term ends when the election lease does: with
	// etcd down a read would otherwise block past the lease and the replica
	// would go on calling itself leader.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-session.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	l := &leader{
		c:       c,
		cli:     cli,
		session: session,
		guard:   clientv3.Compare(clientv3.CreateRevision(election.Key()), "=", election.Rev()),
		log:     c.log,
		members: map[string]MemberInfo{},
	}
	m, err := NewMachine(spec)
	if err != nil {
		return err
	}
	l.m = m

	// One consistent snapshot at revision rev, then watches from rev+1:
	// nothing is missed in between.
	p := c.prefix
	rresp, err := cli.Get(ctx, p+job.KeyRing)
	if err != nil {
		return fmt.Errorf("coordinator: read ring: %w", err)
	}
	rev := rresp.Header.Revision
	var ring *job.Ring
	var start *job.Start
	if len(rresp.Kvs) > 0 {
		ring = new(job.Ring)
		if err := job.Decode(job.KeyRing, rresp.Kvs[0].Value, ring); err != nil {
			return err // the ring is only written by us: a corrupt one needs a person
		}
		sresp, err := cli.Get(ctx, p+job.StartKey(ring.Epoch), clientv3.WithRev(rev))
		if err != nil {
			return fmt.Errorf("coordinator: read start: %w", err)
		}
		if len(sresp.Kvs) > 0 {
			start = new(job.Start)
			if err := job.Decode(job.StartKey(ring.Epoch), sresp.Kvs[0].Value, start); err != nil {
				return err
			}
		}
	}
	get := func(sub string) ([]*mvccKV, error) {
		resp, err := cli.Get(ctx, p+sub, clientv3.WithPrefix(), clientv3.WithRev(rev))
		if err != nil {
			return nil, fmt.Errorf("coordinator: read %s: %w", sub, err)
		}
		out := make([]*mvccKV, len(resp.Kvs))
		for i, kv := range resp.Kvs {
			out[i] = &mvccKV{key: string(kv.Key), value: kv.Value, create: kv.CreateRevision, mod: kv.ModRevision}
		}
		return out, nil
	}
	members, err := get(job.KeyMembers)
	if err != nil {
		return err
	}
	readies, err := get(job.KeyReady)
	if err != nil {
		return err
	}
	reports, err := get(job.KeyReports)
	if err != nil {
		return err
	}

	last, err := cli.Get(ctx, p+job.KeyEvents, clientv3.WithLastKey()...)
	if err != nil {
		return fmt.Errorf("coordinator: read events: %w", err)
	}
	if len(last.Kvs) > 0 {
		l.eventSeq, _ = strconv.ParseUint(strings.TrimPrefix(string(last.Kvs[0].Key), p+job.KeyEvents), 10, 64)
	}

	c.setLeader(true)
	epoch := uint64(0)
	if ring != nil {
		epoch = ring.Epoch
	}
	c.log.Info("leading", "epoch", epoch, "started", start != nil, "members", len(members))
	if err := l.event(ctx, Record{Time: time.Now(), Kind: KindLeaderElected, Epoch: epoch,
		Reason: fmt.Sprintf("replica %s leads with %d members registered", c.cfg.ID, len(members))}); err != nil {
		return err
	}
	now := time.Now()
	l.batchStart = now
	l.m.Step(LeaderElected{Ring: ring, Start: start})
	for _, kv := range members {
		l.memberPut(kv)
	}
	l.m.Step(MembersChanged{Members: l.memberList()})
	for _, kv := range readies {
		l.readyPut(kv)
	}
	for _, kv := range reports {
		l.reportPut(kv)
	}
	if ring != nil && start == nil {
		l.changeAt = now // an epoch change in flight: count its recovery from here
	}
	if err := l.flush(ctx); err != nil {
		return err
	}

	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	watch := func(sub string) clientv3.WatchChan {
		return cli.Watch(wctx, p+sub, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	}
	wMembers, wReady, wReports := watch(job.KeyMembers), watch(job.KeyReady), watch(job.KeyReports)

	debounce := time.NewTimer(time.Hour)
	debounce.Stop()
	defer debounce.Stop()
	pending := false
	kick := func() {
		if !pending {
			pending = true
			l.batchStart = time.Now()
			debounce.Reset(c.cfg.Debounce)
		}
	}
	deadline := time.NewTimer(time.Hour)
	defer deadline.Stop()
	for {
		l.resetDeadline(deadline)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-session.Done():
			return fmt.Errorf("%w: election lease expired", ErrNotLeader)
		case wresp, ok := <-wMembers:
			if err := watchErr(wresp, ok, job.KeyMembers); err != nil {
				return err
			}
			for _, ev := range wresp.Events {
				if ev.Type == clientv3.EventTypePut {
					l.memberPut(&mvccKV{key: string(ev.Kv.Key), value: ev.Kv.Value, create: ev.Kv.CreateRevision, mod: ev.Kv.ModRevision})
				} else {
					delete(l.members, job.MemberID(string(ev.Kv.Key)))
				}
				l.membersDirty = true
			}
			kick()
		case wresp, ok := <-wReady:
			if err := watchErr(wresp, ok, job.KeyReady); err != nil {
				return err
			}
			for _, ev := range wresp.Events {
				if ev.Type == clientv3.EventTypePut {
					l.readyPut(&mvccKV{key: string(ev.Kv.Key), value: ev.Kv.Value})
				}
			}
			kick()
		case wresp, ok := <-wReports:
			if err := watchErr(wresp, ok, job.KeyReports); err != nil {
				return err
			}
			for _, ev := range wresp.Events {
				if ev.Type == clientv3.EventTypePut {
					l.reportPut(&mvccKV{key: string(ev.Kv.Key), value: ev.Kv.Value, mod: ev.Kv.ModRevision})
				}
			}
			kick()
		case <-debounce.C:
			pending = false
			if err := l.flush(ctx); err != nil {
				return err
			}
		case <-deadline.C:
			l.fireTimers(time.Now())
			l.batchStart = time.Now()
			if err := l.flush(ctx); err != nil {
				return err
			}
		}
	}
}

func watchErr(wresp clientv3.WatchResponse, ok bool, sub string) error {
	if !ok {
		return fmt.Errorf("coordinator: watch %s closed", sub)
	}
	if err := wresp.Err(); err != nil {
		return fmt.Errorf("coordinator: watch %s: %w", sub, err)
	}
	return nil
}

type mvccKV struct {
	key         string
	value       []byte
	create, mod int64
}

// leader is the state of one term of leadership.
type leader struct {
	c       *Coordinator
	cli     *clientv3.Client
	session *concurrency.Session
	guard   clientv3.Cmp
	log     hclog.Logger
	m       *Machine

	members      map[string]MemberInfo
	membersDirty bool
	timers       []timer

	batchStart time.Time // when the first event of the current batch arrived
	changeAt   time.Time // when the membership change being recovered from began
	eventSeq   uint64    // the seq of the newest event in etcd
}

type timer struct {
	at time.Time
	ev TimerFired
}

func (l *leader) memberPut(kv *mvccKV) {
	id := job.MemberID(kv.key)
	mi := MemberInfo{Rev: kv.create}
	if err := job.Decode(kv.key, kv.value, &mi.Member); err != nil {
		mi.Err = err
	} else if mi.Member.ID != id {
		mi.Err = fmt.Errorf("record id %q differs from its key's %q", mi.Member.ID, id)
	}
	mi.Member.ID = id
	l.members[id] = mi
}

func (l *leader) memberList() []MemberInfo {
	out := make([]MemberInfo, 0, len(l.members))
	for _, id := range sortedKeys(l.members) {
		out = append(out, l.members[id])
	}
	return out
}

func (l *leader) readyPut(kv *mvccKV) {
	// ready/<epoch>/<id>
	rest := strings.TrimPrefix(kv.key, l.c.prefix+job.KeyReady)
	es, id, ok := strings.Cut(rest, "/")
	epoch, err := strconv.ParseUint(es, 10, 64)
	if !ok || err != nil {
		l.log.Warn("ignoring a ready key of an unknown form", "key", kv.key)
		return
	}
	var r job.Ready
	if err := job.Decode(kv.key, kv.value, &r); err != nil || r.Epoch != epoch {
		l.log.Warn("ignoring a malformed ready record", "key", kv.key, "error", err)
		return
	}
	l.m.Step(ReadySeen{ID: id, Ready: r})
}

func (l *leader) reportPut(kv *mvccKV) {
	var r job.Report
	key := strings.TrimPrefix(kv.key, l.c.prefix)
	if err := job.Decode(kv.key, kv.value, &r); err != nil {
		l.log.Warn("deleting a malformed report", "key", kv.key, "error", err)
		r = job.Report{} // epoch 0: ignored as stale, and deleted
	}
	l.m.Step(ReportSeen{Key: key, Rev: kv.mod, Report: r})
}

func (l *leader) fireTimers(now time.Time) {
	keep := l.timers[:0]
	for _, t := range l.timers {
		if !t.at.After(now) {
			l.m.Step(t.ev)
		} else {
			keep = append(keep, t)
		}
	}
	l.timers = keep
}

func (l *leader) resetDeadline(t *time.Timer) {
	t.Stop()
	if len(l.timers) == 0 {
		return
	}
	first := l.timers[0].at
	for _, tm := range l.timers[1:] {
		if tm.at.Before(first) {
			first = tm.at
		}
	}
	t.Reset(time.Until(first))
}

// flush feeds the batch's member set to the machine and executes its actions.
func (l *leader) flush(ctx context.Context) error {
	if l.membersDirty {
		l.membersDirty = false
		l.m.Step(MembersChanged{Members: l.memberList()})
	}
	for _, a := range l.m.Actions() {
		if err := l.execute(ctx, a); err != nil {
			return err
		}
	}
	return nil
}

func (l *leader) execute(ctx context.Context, a Action) error {
	c, p := l.c, l.c.prefix
	switch a := a.(type) {
	case Notice:
		args := []any{"kind", a.Kind, "epoch", a.Epoch, "reason", a.Reason}
		if a.WorkerID != "" {
			args = append(args, "worker_id", a.WorkerID)
		}
		l.log.Info("membership "+strings.ReplaceAll(a.Kind, "_", " "), args...)
		return l.event(ctx, Record{Time: time.Now(), Kind: a.Kind, WorkerID: a.WorkerID, Epoch: a.Epoch, Reason: a.Reason})
	case ArmTimer:
		d := c.cfg.ReadyTimeout
		if a.Timer == TimerBootstrap {
			d = c.cfg.BootstrapTimeout
		}
		// One timer per kind: a new epoch's ready timer replaces the last.
		keep := l.timers[:0]
		for _, t := range l.timers {
			if t.ev.Timer != a.Timer {
				keep = append(keep, t)
			}
		}
		l.timers = append(keep, timer{at: time.Now().Add(d), ev: TimerFired(a)})
	case PublishRing:
		if err := l.txn(ctx, "publish ring", clientv3.OpPut(p+job.KeyRing, job.Encode(a.Ring))); err != nil {
			return err
		}
		if l.changeAt.IsZero() {
			l.changeAt = l.batchStart
		}
		ids := make([]string, len(a.Ring.Members))
		for i, rm := range a.Ring.Members {
			ids[i] = rm.ID
		}
		l.log.Info("published ring", "epoch", a.Ring.Epoch, "members", strings.Join(ids, ","), "reason", a.Ring.Reason)
		return l.event(ctx, Record{Time: time.Now(), Kind: KindRing, Epoch: a.Ring.Epoch, Reason: a.Ring.Reason})
	case PublishStart:
		// The previous epoch's barrier keys go in the same transaction: a
		// worker still waiting on them sees the newer ring instead.
		ops := []clientv3.Op{clientv3.OpPut(p+job.StartKey(a.Start.Epoch), job.Encode(a.Start))}
		if prev := a.Start.Epoch - 1; prev > 0 {
			ops = append(ops, clientv3.OpDelete(p+job.StartKey(prev)),
				clientv3.OpDelete(p+job.KeyReady+strconv.FormatUint(prev, 10)+"/", clientv3.WithPrefix()))
		}
		if err := l.txn(ctx, "publish start", clientv3.OpTxn(nil, ops, nil)); err != nil {
			return err
		}
		args := []any{"epoch", a.Start.Epoch, "step", a.Start.Step, "source", a.Start.Source}
		reason := fmt.Sprintf("step %d from %s", a.Start.Step, a.Start.Source)
		var rec time.Duration
		if !l.changeAt.IsZero() {
			rec = time.Since(l.changeAt)
			args = append(args, "recovery", rec)
			reason += fmt.Sprintf(", %s after the membership change", rec.Round(time.Millisecond))
			l.changeAt = time.Time{}
		}
		l.log.Info("epoch started", args...)
		return l.event(ctx, Record{Time: time.Now(), Kind: KindStarted, Epoch: a.Start.Epoch, Reason: reason, Recovery: rec})
	case DeleteMember:
		key := p + job.KeyMembers + a.ID
		op := clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", a.Rev)},
			[]clientv3.Op{clientv3.OpDelete(key)}, nil)
		return l.txn(ctx, "delete member", op)
	case DeleteReport:
		key := p + a.Key
		op := clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", a.Rev)},
			[]clientv3.Op{clientv3.OpDelete(key)}, nil)
		return l.txn(ctx, "delete report", op)
	}
	return nil
}

// Record kinds besides the Notice kinds.
const (
	KindRing          = "ring"
	KindStarted       = "started"
	KindLeaderElected = "leader_elected"
)

// event keeps r in memory and writes it to events/<seq> (guarded like every
// leader write), deleting events older than the newest job.MaxEvents.
func (l *leader) event(ctx context.Context, r Record) error {
	l.c.record(r)
	p := l.c.prefix
	seq := l.eventSeq + 1
	ev := job.Event{Seq: seq, TimeUnix: float64(r.Time.UnixNano()) / 1e9, Kind: r.Kind, WorkerID: r.WorkerID,
		Epoch: r.Epoch, Reason: r.Reason, Leader: l.c.cfg.ID, RecoverySeconds: r.Recovery.Seconds()}
	ops := []clientv3.Op{clientv3.OpPut(p+job.EventKey(seq), job.Encode(ev))}
	if seq > job.MaxEvents {
		// A range, not one key: seqs a failed leader skipped go too.
		ops = append(ops, clientv3.OpDelete(p+job.KeyEvents, clientv3.WithRange(p+job.EventKey(seq-job.MaxEvents+1))))
	}
	if err := l.txn(ctx, "write event", clientv3.OpTxn(nil, ops, nil)); err != nil {
		return err
	}
	l.eventSeq = seq
	return nil
}

// txn runs op only while this replica leads, retrying through etcd
// outages. A failed guard means another replica leads: ErrNotLeader.
func (l *leader) txn(ctx context.Context, what string, op clientv3.Op) error {
	backoff := l.c.backoff()
	for attempt := 1; ; attempt++ {
		tctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		resp, err := l.cli.Txn(tctx).If(l.guard).Then(op).Commit()
		cancel()
		if err == nil {
			if !resp.Succeeded {
				return fmt.Errorf("%w: %s refused", ErrNotLeader, what)
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		select {
		case <-l.session.Done():
			return fmt.Errorf("%w: election lease expired during %s", ErrNotLeader, what)
		default:
		}
		l.log.Warn("etcd write failed, retrying", "op", what, "attempt", attempt, "error", err)
		backoff.wait(ctx)
	}
}

// backoff is an exponential wait from 50 ms up to MaxBackoff.
type backoffState struct {
	d, max time.Duration
}

func (c *Coordinator) backoff() *backoffState {
	return &backoffState{d: 50 * time.Millisecond, max: c.cfg.MaxBackoff}
}

func (b *backoffState) reset() { b.d = 50 * time.Millisecond }

func (b *backoffState) wait(ctx context.Context) {
	t := time.NewTimer(b.d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
	b.d = min(2*b.d, b.max)
}
