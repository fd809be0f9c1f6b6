// Package monitor serves one job's state, read from etcd, to people and
// Prometheus: /metrics, /api/v1/status (JSON), /healthz and a dashboard at /
// embedded in the binary. It only reads etcd (one watch on the job prefix,
// cached in memory), so any number of monitors may run beside a job; it must
// never write the job's keys. It can also export the curves as TensorBoard
// event files.
package monitor

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/bmojo/bmojo/internal/etcdserver"
	"github.com/bmojo/bmojo/job"
)

// Config configures a monitor of one job.
type Config struct {
	// JobName selects the job's keys, job.Prefix(JobName). Required.
	JobName string
	// Client, when set, is used instead of connecting with Etcd; the
	// monitor does not close it.
	Client *clientv3.Client
	// Etcd is how to reach etcd when Client is nil.
	Etcd etcdserver.ClientConfig
	// Token, when set, is the bearer token every endpoint but /healthz and
	// the dashboard's static files requires. Default none.
	Token string
	// LossPoints caps the points of each curve in /api/v1/status
	// (downsampled past it). Default 400.
	LossPoints int
	// EventsShown is how many of the newest membership events
	// /api/v1/status lists. Default 100.
	EventsShown int
	// TensorBoardDir, when set, receives a TensorBoard event file with
	// loss, val_loss and tokens_per_s per step. Default none.
	TensorBoardDir string
	// TLS, when set, serves HTTPS (Start). Default plain HTTP.
	TLS *tls.Config
	// Logger is the parent logger. Default: hclog.NewNullLogger.
	Logger hclog.Logger
}

// Validate checks cfg without side effects.
func (c Config) Validate() error {
	if c.JobName == "" || strings.ContainsAny(c.JobName, "/ \t\n") {
		return fmt.Errorf("monitor: --job is %q: want a non-empty name without '/' or spaces", c.JobName)
	}
	if c.LossPoints < 0 || c.EventsShown < 0 {
		return fmt.Errorf("monitor: LossPoints and EventsShown must be >= 0")
	}
	if c.Client == nil {
		if err := c.Etcd.Validate(); err != nil {
			return fmt.Errorf("monitor: %w", err)
		}
	}
	return nil
}

// Monitor caches one job's state from etcd. Run it once; serve Handler.
type Monitor struct {
	cfg    Config
	log    hclog.Logger
	prefix string
	tb     *tbExport

	mu     sync.Mutex
	synced bool // the first snapshot is loaded
	st     *state
}

// state is the cached job, rebuilt from a snapshot after a watch breaks.
type state struct {
	spec        *job.Spec
	ring        job.Ring
	progress    job.Progress
	members     map[string]job.Member
	stats       map[string]job.WorkerStats
	losses      []Point
	valLosses   []Point
	tps         []Point
	samples     []Sample
	events      []job.Event
	eventCounts map[string]float64
	ckpt        *Checkpoint
	done        *job.Done
}

func newState() *state {
	return &state{members: map[string]job.Member{}, stats: map[string]job.WorkerStats{}, eventCounts: map[string]float64{}}
}

// New checks cfg and returns a monitor ready to Run.
func New(cfg Config) (*Monitor, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.LossPoints == 0 {
		cfg.LossPoints = 400
	}
	if cfg.EventsShown == 0 {
		cfg.EventsShown = 100
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	return &Monitor{cfg: cfg, log: cfg.Logger.With("job", cfg.JobName), prefix: job.Prefix(cfg.JobName), st: newState()}, nil
}

// Run keeps the cache in sync with etcd until ctx ends (it returns nil
// then). etcd being unavailable is not an error: it retries.
func (m *Monitor) Run(ctx context.Context) error {
	cli, release, err := etcdserver.ClientOr(ctx, m.cfg.Client, m.cfg.Etcd, m.log.Named("etcd"))
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("monitor: %w", err)
	}
	defer release()
	if m.cfg.TensorBoardDir != "" {
		tb, err := newTBExport(m.cfg.TensorBoardDir)
		if err != nil {
			return err
		}
		tb.log = func(err error) { m.log.Warn("tensorboard export failed", "error", err) }
		defer tb.close()
		m.mu.Lock()
		m.tb = tb
		m.mu.Unlock()
		m.log.Info("writing tensorboard events", "file", tb.w.Path())
	}
	backoff := 50 * time.Millisecond
	for ctx.Err() == nil {
		err := m.sync(ctx, cli)
		if ctx.Err() != nil {
			break
		}
		m.log.Warn("etcd watch interrupted, reloading", "error", err)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
		backoff = min(2*backoff, 2*time.Second)
	}
	return nil
}

// sync loads a snapshot of the job's keys, then applies the watch from the
// snapshot's revision on; it returns when the watch fails.
func (m *Monitor) sync(ctx context.Context, cli *clientv3.Client) error {
	gctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	resp, err := cli.Get(gctx, m.prefix, clientv3.WithPrefix())
	cancel()
	if err != nil {
		return fmt.Errorf("monitor: read %s: %w", m.prefix, err)
	}
	st := newState()
	for _, kv := range resp.Kvs {
		m.apply(st, string(kv.Key), kv.Value, false)
	}
	m.mu.Lock()
	m.st, m.synced = st, true
	m.mu.Unlock()

	wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer wcancel()
	for wresp := range cli.Watch(wctx, m.prefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1)) {
		if err := wresp.Err(); err != nil {
			return fmt.Errorf("monitor: watch: %w", err)
		}
		m.mu.Lock()
		for _, ev := range wresp.Events {
			m.apply(m.st, string(ev.Kv.Key), ev.Kv.Value, ev.Type == clientv3.EventTypeDelete)
		}
		m.mu.Unlock()
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return errors.New("monitor: watch closed")
}

// apply folds one key's put or delete into st. Malformed records are
// skipped: the monitor shows what it can.
func (m *Monitor) apply(st *state, key string, val []byte, deleted bool) {
	k := strings.TrimPrefix(key, m.prefix)
	dec := func(v any) bool {
		if deleted {
			return false
		}
		if err := job.Decode(k, val, v); err != nil {
			m.log.Debug("skipping a malformed record", "key", k, "error", err)
			return false
		}
		return true
	}
	switch {
	case k == job.KeySpec:
		var s job.Spec
		if dec(&s) {
			st.spec = &s
		}
	case k == job.KeyRing:
		var r job.Ring
		if dec(&r) {
			st.ring = r
		}
	case k == job.KeyProgress:
		var p job.Progress
		if !dec(&p) {
			return
		}
		st.progress = p
		st.samples = append(st.samples, Sample{Unix: p.UpdatedUnix, Step: p.Step})
		if len(st.samples) > 512 {
			st.samples = append(st.samples[:0], st.samples[256:]...)
		}
		st.tps = bound(upsert(st.tps, Point{Step: p.Step, Value: finite(p.TokensPerS)}))
		m.tb.scalar("tokens_per_s", p.Step, p.TokensPerS)
		if p.ValLoss != 0 {
			st.valLosses = bound(upsert(st.valLosses, Point{Step: p.Step, Value: finite(p.ValLoss)}))
			m.tb.scalar("val_loss", p.Step, p.ValLoss)
		}
	case k == job.KeyDone:
		var d job.Done
		if dec(&d) {
			st.done = &d
			if d.ValLoss != 0 {
				st.valLosses = bound(upsert(st.valLosses, Point{Step: d.Step, Value: finite(d.ValLoss)}))
				m.tb.scalar("val_loss", d.Step, d.ValLoss)
			}
		}
	case k == job.KeyLatestCkpt:
		// The manifest (checkpoints/<step>) carries the dir; this key only
		// says which is newest.
		if step, err := strconv.Atoi(string(val)); err == nil && !deleted && (st.ckpt == nil || st.ckpt.Step != step) {
			st.ckpt = &Checkpoint{Step: step}
		}
	case strings.HasPrefix(k, job.KeyCheckpoints):
		var man job.Manifest
		if dec(&man) && (st.ckpt == nil || man.Step >= st.ckpt.Step) {
			st.ckpt = &Checkpoint{Step: man.Step, Dir: man.Dir}
		}
	case strings.HasPrefix(k, job.KeyLedger):
		var e job.LedgerEntry
		if dec(&e) {
			// Ledger steps count from 0; curves use completed steps, as progress does.
			st.losses = bound(upsert(st.losses, Point{Step: e.Step + 1, Value: finite(e.Loss)}))
			m.tb.scalar("loss", e.Step+1, e.Loss)
		}
	case strings.HasPrefix(k, job.KeyMembers):
		id := job.MemberID(k)
		var mb job.Member
		if deleted {
			delete(st.members, id)
		} else if dec(&mb) {
			st.members[id] = mb
		}
	case strings.HasPrefix(k, job.KeyStats):
		var ws job.WorkerStats
		if dec(&ws) {
			st.stats[job.MemberID(k)] = ws
		}
	case strings.HasPrefix(k, job.KeyEvents):
		var ev job.Event
		if !dec(&ev) {
			return // a trimmed event leaves the log; the counters keep it
		}
		st.eventCounts[ev.Kind]++
		st.events = append(st.events, ev)
		if len(st.events) > job.MaxEvents {
			st.events = append(st.events[:0], st.events[len(st.events)-job.MaxEvents:]...)
		}
	}
}

// Synced reports whether the first snapshot has loaded.
func (m *Monitor) Synced() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.synced
}

// ErrNoJob means etcd holds no spec for the job.
var ErrNoJob = errors.New("job does not exist")

// ErrNotSynced means the monitor has not read etcd yet.
var ErrNotSynced = errors.New("not synced with etcd yet")

// Status computes the job's status from the cache.
func (m *Monitor) Status() (Status, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.synced {
		return Status{}, ErrNotSynced
	}
	st := m.st
	if st.spec == nil {
		return Status{}, fmt.Errorf("%w: no job %q in etcd (no %s%s key)", ErrNoJob, m.cfg.JobName, m.prefix, job.KeySpec)
	}
	return buildStatus(m.cfg.JobName, st, m.cfg.LossPoints, m.cfg.EventsShown), nil
}

// buildStatus is the pure part of Status.
func buildStatus(jobName string, st *state, points, events int) Status {
	p := st.progress
	s := Status{
		Job: jobName, Step: p.Step, Steps: p.Steps, Epoch: st.ring.Epoch, TokensPerS: finite(p.TokensPerS),
		Loss: finite(p.Loss), RingSize: len(st.ring.Members), Skipped: p.Skipped, Updated: p.UpdatedUnix,
		LossHistory:       Downsample(st.losses, points),
		ValLossHistory:    Downsample(st.valLosses, points),
		TokensPerSHistory: Downsample(st.tps, points),
		Checkpoint:        st.ckpt,
		Done:              st.done != nil,
		Final:             st.done,
	}
	if s.Steps == 0 && st.spec != nil {
		s.Steps = specSteps(st.spec)
	}
	if n := len(st.valLosses); n > 0 {
		s.ValLoss = st.valLosses[n-1].Value
	}
	if st.done != nil && st.done.Step > s.Step {
		s.Step = st.done.Step
	}
	if s.Steps > 0 {
		s.Progress = min(1, float64(s.Step)/float64(s.Steps))
	}
	if st.done != nil {
		zero := 0.0
		s.ETASeconds = &zero
	} else if eta, ok := ETA(st.samples, s.Steps); ok {
		s.ETASeconds = &eta
	}
	evs := st.events
	if len(evs) > events {
		evs = evs[len(evs)-events:]
	}
	s.Events = append([]job.Event{}, evs...)
	for i := len(st.events) - 1; i >= 0; i-- {
		if st.events[i].RecoverySeconds > 0 {
			s.LastRecoverySeconds = st.events[i].RecoverySeconds
			break
		}
	}
	s.Workers = workers(st)
	return s
}

// workers builds the worker table: ring members in rank order, then the
// registered ones not in the ring, then the gone ones.
func workers(st *state) []WorkerStatus {
	ids := map[string]bool{}
	for _, rm := range st.ring.Members {
		ids[rm.ID] = true
	}
	for id := range st.members {
		ids[id] = true
	}
	for id := range st.stats {
		ids[id] = true
	}
	out := make([]WorkerStatus, 0, len(ids))
	for id := range ids {
		w := WorkerStatus{ID: id, Rank: st.ring.Rank(id)}
		mb, registered := st.members[id]
		if registered {
			w.Endpoint, w.Device = mb.Endpoint, mb.Device
		} else if w.Rank >= 0 {
			w.Endpoint = st.ring.Members[w.Rank].Endpoint
		}
		switch {
		case registered && w.Rank >= 0:
			w.State, w.Up = "up", true
		case registered:
			w.State, w.Up = "joining", true
		default:
			w.State = "down"
			for i := len(st.events) - 1; i >= 0; i-- {
				if ev := st.events[i]; ev.WorkerID == id {
					w.Reason = ev.Kind + ": " + ev.Reason
					break
				}
			}
		}
		if ws, ok := st.stats[id]; ok {
			if w.Device == "" {
				w.Device = ws.Device
			}
			w.LastStep, w.Step, w.Data, w.Compute = ws.Step, ws.StepSeconds, ws.DataSeconds, ws.ComputeSec
			w.Wait, w.Optimizer, w.TokensPS = ws.WaitSeconds, ws.OptimSeconds, finite(ws.TokensPerS)
			w.GradNorm, w.Ckpt, w.Updated = finite(ws.GradNorm), ws.CheckpointSec, ws.UpdatedUnix
			w.GPU, w.arrival = ws.GPU, ws.ArrivalUnix
		}
		out = append(out, w)
	}
	order := func(w WorkerStatus) int {
		switch {
		case w.Rank >= 0:
			return w.Rank
		case w.Up:
			return 1 << 20
		default:
			return 1 << 21
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if a, b := order(out[i]), order(out[j]); a != b {
			return a < b
		}
		return out[i].ID < out[j].ID
	})
	MarkStraggler(out)
	MarkArrivals(out)
	return out
}

// specSteps reads steps from the job YAML (before the first progress record).
func specSteps(s *job.Spec) int {
	for _, line := range strings.Split(s.YAML, "\n") {
		if v, ok := strings.CutPrefix(line, "steps:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}
