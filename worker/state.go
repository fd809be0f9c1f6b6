package worker

import (
	"fmt"
	"time"

	"github.com/bmojo/bmojo/job"
)

// This file is the worker's side of the protocol (package job documents it)
// as a deterministic state machine with no I/O, like the coordinator's: the
// driver (worker.go) turns etcd watch events, the results of the work it
// ran and clock ticks into Events, calls Step for each, then executes what
// Actions returns. Every decision a worker takes about rings, steps,
// evaluation, checkpoints, reports and the end of the job is here, and the
// golden scripts in testdata/ exercise each rule.
//
// Rules:
//
//   - A ring is acted upon only when its epoch is newer than every ring seen
//     and its entry for this worker's id carries this process's endpoint (an
//     entry with another endpoint is an earlier incarnation of the id: the
//     coordinator publishes a ring with this one next).
//   - A newer ring aborts the epoch in progress at once (CloseRing): the step
//     in flight fails and is redone in the new epoch, never half-applied (the
//     engine applies a step only after its every sum arrived). Ready is
//     written only once the work in flight has ended, at the step the model
//     is really at: a step that completed just before the abort counts.
//   - Ready is written at the current step; training starts when start/<epoch>
//     names that epoch. After Connect (and the state transfer Start.Sync
//     asks for) the worker must be at Start.Step.
//   - One piece of work runs at a time: Connect, Train (one step) or Evaluate.
//   - After each step every member records it (Record) before anything else
//     can fail: it holds the step's ledger entry, built from every rank's
//     report of what it read (they travel in the step's own collective), so
//     the entry outlives any one worker. Rank 0 (Primary) commits it at once
//     with the progress record; the others commit the entries still missing
//     when their ring changes or they exit. Evaluation follows at eval_every
//     and at the last step. An epoch that starts at such a step evaluates
//     first, on every member, whether or not it evaluated that step before:
//     so a failure that interrupts an evaluation is mended by the next epoch
//     (the last step's evaluation always happens), and the members agree on
//     their first collective. (Which member had finished the evaluation is
//     not shared: a member synced to the step never reached it itself, and a
//     failure can end the collective on one rank and not another. Were they to
//     differ, one would evaluate while another trained, the ring would fail,
//     and every next epoch would fail the same way.) Rank 0 checkpoints at
//     checkpoint_every and at the end, after that step's evaluation.
//   - Every write a worker commits (ledger, progress, done, checkpoint manifests) is fenced on the
//     ring record it is a member of: entering a ring's epoch as a member sets
//     the fence to that record's revision (Fence), leaving the ring clears
//     it, so a worker of a stale ring writes nothing.
//   - A failed collective is reported naming the failed peer (never this
//     worker); the ring stays open until the next epoch arrives, so that the
//     abort reaches every rank before anyone's stream breaks.
//   - At the last step, after its evaluation, rank 0 finishes the job
//     (checkpoint, flush, done); every worker exits when it sees done.
//   - Health: ready while registered, in the current ring and training (or
//     finished); live unless work (a connect, a step, an evaluation) has
//     gone on for stallAfter without ending, stallAfter being
//     max(minStall, stallSteps × the mean step time). Waiting for the
//     coordinator is not a stall.

// Event is an input of the Machine.
type Event interface{ isEvent() }

// Registered says the member key is written (with this process's endpoint).
type Registered struct{ At time.Time }

// RingSeen is a ring record and its etcd mod revision (what writes are
// fenced on).
type RingSeen struct {
	Ring job.Ring
	Rev  int64
}

// StartSeen is a start/<epoch> record.
type StartSeen struct{ Start job.Start }

// DoneSeen is the done record.
type DoneSeen struct{}

// Connected reports a Connect that succeeded: the worker is at Step (after
// the state transfer, when one was ordered).
type Connected struct {
	Epoch uint64
	Step  int
	At    time.Time
}

// StepDone reports a Train that completed: the model is now at Step.
type StepDone struct {
	Epoch uint64
	Step  int
	At    time.Time
}

// EvalDone reports an Evaluate that completed at Step with validation loss Val.
type EvalDone struct {
	Epoch uint64
	Step  int
	Val   float64
	At    time.Time
}

// Failed reports that work of Epoch failed in its collective: Suspect is the
// member the ring blamed ("" if none), Err what happened.
type Failed struct {
	Epoch   uint64
	Suspect string
	Err     string
}

// Tick is the clock, for health.
type Tick struct{ Now time.Time }

func (Registered) isEvent() {}
func (RingSeen) isEvent()   {}
func (StartSeen) isEvent()  {}
func (DoneSeen) isEvent()   {}
func (Connected) isEvent()  {}
func (StepDone) isEvent()   {}
func (EvalDone) isEvent()   {}
func (Failed) isEvent()     {}
func (Tick) isEvent()       {}

// Action is an output of the Machine.
type Action interface{ isAction() }

// CloseRing closes the open ring, failing any collective in flight.
type CloseRing struct{}

// PutReady writes ready/<Epoch>/<id> at Step.
type PutReady struct {
	Epoch uint64
	Step  int
}

// Connect opens the ring of Start.Epoch at Rank and, if Start.Sync, takes
// part in the state transfer from Start.Source; it ends in Connected or
// Failed.
type Connect struct {
	Ring  job.Ring
	Rank  int
	Start job.Start
}

// Train runs one step in the ring of Epoch; it ends in StepDone or Failed.
type Train struct{ Epoch uint64 }

// Evaluate runs the validation pass in the ring of Epoch; it ends in
// EvalDone or Failed.
type Evaluate struct{ Epoch uint64 }

// Record holds the ledger entry of the step that ended at Step (trained in
// the ring of Epoch); Primary (rank 0) commits it at once and queues the
// progress record, the other members keep it until their ring changes.
type Record struct {
	Epoch   uint64
	Step    int
	Primary bool
}

// Fence sets the ring revision every write is fenced on: the ring of Epoch,
// which this worker is a member of; Rev 0 holds writes (not a member).
type Fence struct {
	Epoch uint64
	Rev   int64
}

// Progress (rank 0) queues the progress record with the validation loss.
type Progress struct {
	Step int
	Val  float64
}

// Checkpoint (rank 0) starts writing a checkpoint of Step in the background.
type Checkpoint struct {
	Epoch uint64
	Step  int
	Val   float64
}

// Report writes a report naming Suspect as failed in Epoch.
type Report struct {
	Epoch   uint64
	Suspect string
	Err     string
}

// Finish (rank 0) ends the job: the last checkpoint is written, every queued
// record is flushed, then done is written.
type Finish struct {
	Step int
	Val  float64
}

// SetHealth changes what the health service reports.
type SetHealth struct {
	Ready, Live bool
	Reason      string
}

// Exit ends the worker: the job is done.
type Exit struct{}

// Fatal ends the worker with an error: the protocol was broken.
type Fatal struct{ Err error }

func (CloseRing) isAction()  {}
func (PutReady) isAction()   {}
func (Connect) isAction()    {}
func (Train) isAction()      {}
func (Evaluate) isAction()   {}
func (Record) isAction()     {}
func (Fence) isAction()      {}
func (Progress) isAction()   {}
func (Checkpoint) isAction() {}
func (Report) isAction()     {}
func (Finish) isAction()     {}
func (SetHealth) isAction()  {}
func (Exit) isAction()       {}
func (Fatal) isAction()      {}

// Health thresholds (see the rules above).
const (
	minStall   = 2 * time.Minute
	stallSteps = 20
)

type phase int

const (
	idle       phase = iota // not in the current ring: waiting for one
	waitStart               // ready written: waiting for start/<epoch>
	connecting              // Connect in flight
	training                // Train in flight
	evaluating              // Evaluate in flight
	failed                  // the epoch's collective failed: waiting for a newer ring
	finished                // Finish issued (rank 0) or the last step done: waiting for done
	exited
)

var phaseNames = [...]string{"idle", "wait-start", "connecting", "training", "evaluating", "failed", "finished", "exited"}

func (p phase) String() string { return phaseNames[p] }

// MachineConfig is what the machine needs of the job and of this process.
type MachineConfig struct {
	ID, Endpoint    string
	Steps           int // the job's steps
	EvalEvery       int // 0 = only at the end
	CheckpointEvery int // 0 = only at the end
	Step            int // where the model starts (a resumed checkpoint's data step)
}

// Machine is the worker's protocol state.
type Machine struct {
	cfg   MachineConfig
	step  int // the model's data step
	phase phase

	registered bool
	ring       job.Ring  // the newest ring seen
	ringRev    int64     // its mod revision
	fence      int64     // the revision writes are fenced on (0: none)
	rank       int       // this worker's rank in ring, -1 if not in it
	epoch      uint64    // the epoch this worker acts in (ready written)
	start      job.Start // start/<epoch> once seen
	busy       bool      // a Connect, Train or Evaluate is in flight
	evalAt     int       // the step whose evaluation is owed, -1 if none
	lastVal    float64   // the newest validation loss

	// health
	health   SetHealth
	lastStep time.Time // the newest step, connect or evaluation
	meanStep time.Duration

	out []Action
}

// NewMachine returns the machine of a worker whose model is at cfg.Step.
func NewMachine(cfg MachineConfig) (*Machine, error) {
	if cfg.ID == "" || cfg.Endpoint == "" || cfg.Steps <= 0 || cfg.Step < 0 || cfg.Step > cfg.Steps {
		return nil, fmt.Errorf("worker: machine config %+v: need an id, an endpoint, steps > 0 and 0 ≤ step ≤ steps", cfg)
	}
	m := &Machine{cfg: cfg, step: cfg.Step, rank: -1, evalAt: -1,
		health: SetHealth{Live: true, Reason: "starting"}}
	if cfg.Step == cfg.Steps {
		m.evalAt = cfg.Step // resumed at the end: the final evaluation is owed
	}
	return m, nil
}

// Step applies one event.
func (m *Machine) Step(ev Event) {
	if m.phase == exited {
		return
	}
	switch e := ev.(type) {
	case Registered:
		m.registered = true
		m.lastStep = e.At
	case RingSeen:
		m.ringSeen(e.Ring, e.Rev)
	case StartSeen:
		if m.phase == waitStart && e.Start.Epoch == m.epoch {
			m.start = e.Start
			m.phase, m.busy = connecting, true
			m.emit(Connect{Ring: m.ring, Rank: m.rank, Start: e.Start})
		}
	case DoneSeen:
		m.emit(CloseRing{}, Exit{})
		m.phase = exited
	case Connected:
		m.busy = false
		m.step = e.Step // after the state transfer, if one ran
		if m.superseded(e.Epoch) {
			m.next()
			return
		}
		m.lastStep = e.At
		if e.Step != m.start.Step {
			m.emit(Fatal{fmt.Errorf("worker: epoch %d starts at step %d but this worker is at step %d and no sync was ordered",
				e.Epoch, m.start.Step, e.Step)})
			m.phase = exited
			return
		}
		if m.step > 0 && m.evalDue(m.step) {
			m.evalAt = m.step // every member evaluates first (see the rules)
		}
		m.work()
	case StepDone:
		m.busy = false
		m.observeStep(e.At)
		m.step = e.Step // applied, whichever epoch it ran in
		if e.Epoch != m.epoch || m.phase != training {
			m.next()
			return
		}
		m.emit(Record{Epoch: e.Epoch, Step: e.Step, Primary: m.rank == 0})
		if m.superseded(e.Epoch) {
			m.next() // the step counts; the next one runs in the new epoch
			return
		}
		if m.evalDue(e.Step) {
			m.evalAt = e.Step
		} else if m.rank == 0 && m.checkpointDue(e.Step) {
			m.emit(Checkpoint{Epoch: e.Epoch, Step: e.Step})
		}
		m.work()
	case EvalDone:
		m.busy = false
		m.lastStep = e.At
		if e.Step == m.evalAt {
			m.evalAt, m.lastVal = -1, e.Val
			if m.rank == 0 && e.Epoch == m.epoch {
				m.emit(Progress{Step: e.Step, Val: e.Val})
				if m.checkpointDue(e.Step) && e.Step < m.cfg.Steps {
					m.emit(Checkpoint{Epoch: e.Epoch, Step: e.Step, Val: e.Val})
				}
			}
		}
		if m.superseded(e.Epoch) || m.phase != evaluating {
			m.next()
			return
		}
		m.work()
	case Failed:
		m.busy = false
		if e.Epoch == m.epoch && (m.phase == connecting || m.phase == training || m.phase == evaluating) {
			if e.Suspect != "" && e.Suspect != m.cfg.ID {
				m.emit(Report(e))
			}
			m.phase = failed
		}
		m.next()
	case Tick:
		m.tick(e.Now)
	}
}

// ringSeen handles a ring record.
func (m *Machine) ringSeen(r job.Ring, rev int64) {
	if r.Epoch == m.ring.Epoch && rev > m.ringRev {
		// The same epoch written again (a coordinator retrying its
		// write): the fence follows the record.
		m.ringRev = rev
		if m.fence != 0 && m.epoch == r.Epoch {
			m.setFence(rev)
		}
		return
	}
	if r.Epoch <= m.ring.Epoch {
		return
	}
	active := m.phase != idle && m.phase != exited
	m.ring, m.ringRev = r, rev
	m.rank = r.Rank(m.cfg.ID)
	if m.rank >= 0 && r.Members[m.rank].Endpoint != m.cfg.Endpoint {
		m.rank = -1 // an earlier incarnation of this id
	}
	if active && m.epoch < r.Epoch {
		m.emit(CloseRing{})
	}
	// A finished worker joins a newer ring too: if rank 0 died before done
	// was written, the new rank 0 finishes the job.
	m.next()
}

// superseded says whether work of epoch is stale: it ran in another epoch
// than this worker's, or a newer ring has arrived since.
func (m *Machine) superseded(epoch uint64) bool {
	return epoch != m.epoch || m.ring.Epoch > m.epoch
}

// next moves to the newest ring once no work is in flight.
func (m *Machine) next() {
	if m.busy || m.phase == exited {
		return
	}
	if m.ring.Epoch == m.epoch {
		return // nothing newer: keep waiting (start, or a newer ring after a failure)
	}
	if m.rank < 0 {
		m.phase = idle
		m.setFence(0)
		return
	}
	m.epoch, m.start = m.ring.Epoch, job.Start{}
	m.phase = waitStart
	m.setFence(m.ringRev)
	m.emit(PutReady{Epoch: m.epoch, Step: m.step})
}

// setFence emits Fence when the revision writes are fenced on changes.
func (m *Machine) setFence(rev int64) {
	if rev != m.fence {
		m.fence = rev
		m.emit(Fence{Epoch: m.ring.Epoch, Rev: rev})
	}
}

// work issues what comes next in an epoch that has connected.
func (m *Machine) work() {
	switch {
	case m.evalAt == m.step:
		m.phase, m.busy = evaluating, true
		m.emit(Evaluate{Epoch: m.epoch})
	case m.step < m.cfg.Steps:
		m.phase, m.busy = training, true
		m.emit(Train{Epoch: m.epoch})
	default:
		m.phase = finished
		if m.rank == 0 {
			m.emit(Finish{Step: m.step, Val: m.lastVal})
		}
	}
}

func (m *Machine) evalDue(step int) bool {
	return step == m.cfg.Steps || (m.cfg.EvalEvery > 0 && step%m.cfg.EvalEvery == 0)
}

func (m *Machine) checkpointDue(step int) bool {
	return step == m.cfg.Steps || (m.cfg.CheckpointEvery > 0 && step%m.cfg.CheckpointEvery == 0)
}

// observeStep keeps a running mean of the step time, for health.
func (m *Machine) observeStep(at time.Time) {
	if !m.lastStep.IsZero() && at.After(m.lastStep) {
		d := at.Sub(m.lastStep)
		if m.meanStep == 0 {
			m.meanStep = d
		} else {
			m.meanStep = (7*m.meanStep + d) / 8
		}
	}
	m.lastStep = at
}

func (m *Machine) stallAfter() time.Duration {
	return max(minStall, stallSteps*m.meanStep)
}

// tick re-derives health at now and emits it when it changed.
func (m *Machine) tick(now time.Time) {
	h := SetHealth{Live: true}
	working := m.phase == training || m.phase == evaluating || m.phase == connecting
	stalled := working && !m.lastStep.IsZero() && now.Sub(m.lastStep) > m.stallAfter()
	switch {
	case !m.registered:
		h.Reason = "not registered"
	case m.rank < 0:
		h.Reason = "not in the current ring"
	case stalled:
		h.Live = false
		h.Reason = fmt.Sprintf("no step for %v (stall limit %v)", now.Sub(m.lastStep).Round(time.Second), m.stallAfter().Round(time.Second))
	case m.phase == training || m.phase == evaluating:
		h.Ready, h.Reason = true, "training"
	case m.phase == finished:
		h.Ready, h.Reason = true, "finished"
	default:
		h.Reason = m.phase.String()
	}
	if h != m.health {
		m.health = h
		m.emit(h)
	}
}

func (m *Machine) emit(a ...Action) { m.out = append(m.out, a...) }

// Actions returns and clears what the machine asked for since the last call.
func (m *Machine) Actions() []Action {
	out := m.out
	m.out = nil
	return out
}

// Phase names the machine's phase (for logs and tests).
func (m *Machine) Phase() string { return m.phase.String() }

// Done says the machine has ended (Exit or Fatal was emitted).
func (m *Machine) Done() bool { return m.phase == exited }
