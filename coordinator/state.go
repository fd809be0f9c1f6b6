package coordinator

import (
	"fmt"
	"slices"
	"strings"

	"github.com/bmojo/bmojo/job"
)

// This file is the membership/epoch logic of the coordinator leader as a
// deterministic state machine with no I/O, in the style of etcd's raft: the
// etcd layer (coordinator.go) turns watch responses and timers into Events,
// calls Step for each, then Actions once per batch and executes what comes
// out. Everything that decides what the cluster does is here, and every rule
// is exercised by the golden scripts in testdata/.
//
// Protocol decisions where the cluster package doc is silent:
//
//   - Rank order is the members sorted by host, then by id (as strings), so
//     the members of one host are contiguous, hosts in name order: the
//     workers' hierarchical all-reduce takes its rings from that order.
//     Members with no host (older builds) sort first; with no hosts at
//     all the order is the ids'.
//   - First ring: the machine waits until JobSpec.Workers acceptable members
//     are registered. The bootstrap timer, armed when the first member is
//     seen, lets it start with fewer (but at least MinRing) if the others
//     never come. This wait happens once per job: a persisted ring (epoch
//     > 0) means the job already started.
//   - A ring smaller than MinRing is never published; the machine waits for
//     members to come back.
//   - A member whose key changed (another endpoint, or a new create
//     revision: it re-registered after its key was deleted) leaves and joins
//     again: it gets a new epoch.
//   - A report is acted upon only when it names the current epoch and both
//     reporter and suspect are members of the current ring and neither is
//     already being removed: when a peer dies both of its neighbours report
//     it, and when a link between two live workers breaks each reports the
//     other; the first report of a batch wins and the others go stale with
//     the epoch they name. Every report is deleted once read.
//   - Members removed by the coordinator (refused, reported, not ready) have
//     their key deleted, guarded by its create revision so a re-registration
//     is never deleted by mistake; they stay excluded until that key is gone.
//   - When the ready timer of an unstarted epoch fires, the unready members
//     are removed and a new epoch is published with the ready ones, unless
//     that would leave fewer than MinRing members: then the machine keeps
//     waiting and re-arms the timer.
//   - Start.Source is the lowest-ranked member among those at the max step.
//     Start.Sync is set when a member is behind that step, or was not in
//     the last started epoch (a new process has no state even at the same
//     step), or, for a new leader that found an unstarted ring after epoch
//     1, always: it cannot tell who is new, and a needless broadcast only
//     costs time. The first ring's members all start fresh: no sync.
//   - A member-set change outranks a pending start: if both happen in one
//     batch, only the new ring is published.

// MemberInfo is one members/<id> key as the etcd layer read it.
type MemberInfo struct {
	Member job.Member
	// Rev is the key's create revision: a re-registration has a new one.
	Rev int64
	// Err is set when the record could not be decoded; the member is refused.
	Err error
}

// Event is an input of the Machine.
type Event interface{ isEvent() }

// MembersChanged carries the full current set of members/ keys.
type MembersChanged struct{ Members []MemberInfo }

// ReadySeen is a ready/<epoch>/<id> record.
type ReadySeen struct {
	ID    string
	Ready job.Ready
}

// ReportSeen is a reports/<reporter> record; Rev is the key's mod revision.
type ReportSeen struct {
	Key    string // relative to the job prefix
	Rev    int64
	Report job.Report
}

// TimerFired says a timer armed by an ArmTimer action has expired.
type TimerFired struct {
	Timer Timer
	Epoch uint64 // the epoch the timer was armed for (0 for bootstrap)
}

// LeaderElected resets the machine to what etcd holds when this replica
// becomes leader: the persisted ring (nil if none) and the start record of
// its epoch (nil if it has not started). Members, ready records and reports
// follow as ordinary events.
type LeaderElected struct {
	Ring  *job.Ring
	Start *job.Start
}

func (MembersChanged) isEvent() {}
func (ReadySeen) isEvent()      {}
func (ReportSeen) isEvent()     {}
func (TimerFired) isEvent()     {}
func (LeaderElected) isEvent()  {}

// Timer names a deadline the etcd layer keeps for the machine.
type Timer string

const (
	// TimerBootstrap: how long to wait for JobSpec.Workers members once the
	// first one is registered, before starting with fewer.
	TimerBootstrap Timer = "bootstrap"
	// TimerReady: how long the members of a new ring have to write ready.
	TimerReady Timer = "ready"
)

// Action is an output of the Machine.
type Action interface{ isAction() }

// PublishRing writes ring.
type PublishRing struct{ Ring job.Ring }

// PublishStart writes start/<epoch>.
type PublishStart struct{ Start job.Start }

// DeleteMember deletes members/<id> if its create revision is still Rev.
type DeleteMember struct {
	ID     string
	Rev    int64
	Reason string
}

// DeleteReport deletes a consumed report if its mod revision is still Rev.
type DeleteReport struct {
	Key string
	Rev int64
}

// ArmTimer asks for a TimerFired{Timer, Epoch} event after the timer's
// configured duration.
type ArmTimer struct {
	Timer Timer
	Epoch uint64
}

// Notice is a membership event for the log and the dashboard.
type Notice struct {
	Kind     string // joined, left, reported, refused, not_ready, waiting, ignored
	WorkerID string
	Epoch    uint64 // the current ring's epoch when it happened
	Reason   string
}

func (PublishRing) isAction()  {}
func (PublishStart) isAction() {}
func (DeleteMember) isAction() {}
func (DeleteReport) isAction() {}
func (ArmTimer) isAction()     {}
func (Notice) isAction()       {}

// Notice kinds.
const (
	NoticeJoined   = "joined"
	NoticeLeft     = "left"
	NoticeReported = "reported"
	NoticeRefused  = "refused"
	NoticeNotReady = "not_ready"
	NoticeWaiting  = "waiting"
	NoticeIgnored  = "ignored"
)

// Machine is the leader's membership and epoch state. It is not safe for
// concurrent use.
type Machine struct {
	spec    job.Spec
	minRing int

	members map[string]MemberInfo // the last MembersChanged, refused ones excluded
	removed map[string]removal    // members whose key we delete, by id

	ring     job.Ring
	ringRevs map[string]int64 // create revisions of the ring's member keys (0: not known yet)
	started  bool
	// prevStarted holds the members of the last started epoch (nil: none
	// started yet); prevKnown is false for a new leader that found an
	// unstarted ring after epoch 1 and cannot know it.
	prevStarted map[string]bool
	prevKnown   bool
	ready       map[string]int // ready steps of ring.Epoch's members

	fresh          bool // no member set seen since reset
	bootstrapArmed bool
	readyArmed     uint64 // epoch the ready timer is armed for
	waiting        string // last waiting notice, so it is not repeated

	out []Action
}

type removal struct {
	rev    int64
	kind   string
	reason string
}

// NewMachine returns a machine for spec, as a fresh leader with nothing
// persisted. It fails with ErrBadSpec if spec cannot be run.
func NewMachine(spec job.Spec) (*Machine, error) {
	if spec.Workers < 1 {
		return nil, fmt.Errorf("%w: workers is %d, want at least 1", ErrBadSpec, spec.Workers)
	}
	if spec.MinRing < 0 || spec.MinRing > spec.Workers {
		return nil, fmt.Errorf("%w: min_ring is %d, want 0 (meaning 1) to workers (%d)", ErrBadSpec, spec.MinRing, spec.Workers)
	}
	m := &Machine{spec: spec, minRing: max(spec.MinRing, 1)}
	m.reset(nil, nil)
	return m, nil
}

func (m *Machine) reset(r *job.Ring, s *job.Start) {
	m.members = map[string]MemberInfo{}
	m.removed = map[string]removal{}
	m.ring = job.Ring{}
	if r != nil {
		m.ring = *r
	}
	m.ringRevs = map[string]int64{}
	m.started = s != nil && r != nil && s.Epoch == r.Epoch
	m.prevStarted, m.prevKnown = nil, true
	if m.started {
		m.prevStarted = ringIDs(m.ring)
	} else if m.ring.Epoch > 1 {
		m.prevKnown = false
	}
	m.ready = map[string]int{}
	m.fresh = true
	m.bootstrapArmed = false
	m.readyArmed = 0
	m.waiting = ""
}

// Ring returns the last ring published or loaded.
func (m *Machine) Ring() job.Ring { return m.ring }

// Started reports whether the current ring's epoch has been started.
func (m *Machine) Started() bool { return m.started }

// Step applies one event.
func (m *Machine) Step(ev Event) {
	switch ev := ev.(type) {
	case LeaderElected:
		m.reset(ev.Ring, ev.Start)
		m.out = nil
	case MembersChanged:
		m.membersChanged(ev.Members)
	case ReadySeen:
		m.readySeen(ev)
	case ReportSeen:
		m.reportSeen(ev)
	case TimerFired:
		m.timerFired(ev)
	}
}

func (m *Machine) membersChanged(list []MemberInfo) {
	seen := map[string]MemberInfo{}
	for _, mi := range list {
		seen[mi.Member.ID] = mi
	}
	// Removals whose key is gone (or was replaced) are done.
	for id, rm := range m.removed {
		if mi, ok := seen[id]; !ok || mi.Rev != rm.rev {
			delete(m.removed, id)
		}
	}
	// Who was there before: the previous member set, or for a new leader
	// the ring it loaded.
	before := map[string]int64{}
	for id, mi := range m.members {
		before[id] = mi.Rev
	}
	if m.fresh {
		m.fresh = false
		for _, rm := range m.ring.Members {
			before[rm.ID] = 0
		}
	}
	m.members = map[string]MemberInfo{}
	for _, id := range sortedKeys(seen) {
		mi := seen[id]
		if _, ok := m.removed[id]; ok {
			continue
		}
		if why := m.refusal(mi); why != "" {
			m.remove(id, mi.Rev, NoticeRefused, why)
			continue
		}
		m.members[id] = mi
		if m.ring.Rank(id) >= 0 && m.ringRevs[id] == 0 {
			m.ringRevs[id] = mi.Rev // a new leader learns the revisions of the ring it loaded
		}
		if rev, ok := before[id]; !ok {
			m.notice(NoticeJoined, id, "registered at "+mi.Member.Endpoint)
		} else if rev != 0 && rev != mi.Rev {
			m.notice(NoticeJoined, id, "re-registered at "+mi.Member.Endpoint+" (a new process)")
		}
	}
	for _, id := range sortedKeys(before) {
		if _, ok := m.members[id]; !ok {
			if _, ok := m.removed[id]; !ok {
				m.notice(NoticeLeft, id, "lease expired or key deleted")
			}
		}
	}
}

func (m *Machine) notice(kind, id, reason string) {
	m.out = append(m.out, Notice{Kind: kind, WorkerID: id, Epoch: m.ring.Epoch, Reason: reason})
}

// refusal says why a member may not join the job, or "".
func (m *Machine) refusal(mi MemberInfo) string {
	switch {
	case mi.Err != nil:
		return fmt.Sprintf("malformed member record: %v", mi.Err)
	case mi.Member.Protocol != m.spec.Protocol:
		return fmt.Sprintf("protocol %d, the job runs protocol %d", mi.Member.Protocol, m.spec.Protocol)
	case mi.Member.SpecHash != m.spec.Hash:
		return fmt.Sprintf("job spec hash %.12s differs from the job's %.12s (another job file)", mi.Member.SpecHash, m.spec.Hash)
	case mi.Member.CodeHash != m.spec.CodeHash:
		return fmt.Sprintf("code %.12s differs from the job's %.12s (another build)", mi.Member.CodeHash, m.spec.CodeHash)
	case mi.Member.Endpoint == "":
		return "no endpoint"
	}
	return ""
}

// remove deletes a member's key and excludes it until the key is gone.
func (m *Machine) remove(id string, rev int64, kind, reason string) {
	if _, ok := m.removed[id]; ok {
		return
	}
	m.removed[id] = removal{rev: rev, kind: kind, reason: reason}
	delete(m.members, id)
	m.notice(kind, id, reason)
	m.out = append(m.out, DeleteMember{ID: id, Rev: rev, Reason: reason})
}

func (m *Machine) readySeen(ev ReadySeen) {
	if ev.Ready.Epoch != m.ring.Epoch || m.started || m.ring.Rank(ev.ID) < 0 {
		return // stale (an old epoch), early (a ring not yet seen here) or not a member
	}
	m.ready[ev.ID] = ev.Ready.Step
}

func (m *Machine) reportSeen(ev ReportSeen) {
	m.out = append(m.out, DeleteReport{Key: ev.Key, Rev: ev.Rev})
	r := ev.Report
	ignore := func(why string) {
		m.out = append(m.out, Notice{Kind: NoticeIgnored, WorkerID: r.Suspect, Epoch: m.ring.Epoch,
			Reason: fmt.Sprintf("report by %s of epoch %d: %s", r.Reporter, r.Epoch, why)})
	}
	switch {
	case r.Epoch != m.ring.Epoch:
		ignore("stale epoch")
		return
	case m.ring.Rank(r.Reporter) < 0 || m.ring.Rank(r.Suspect) < 0:
		ignore("not both in the ring")
		return
	case r.Reporter == r.Suspect:
		ignore("reporter names itself")
		return
	}
	if _, ok := m.removed[r.Reporter]; ok {
		ignore("reporter is being removed")
		return
	}
	if _, ok := m.removed[r.Suspect]; ok {
		return // already being removed: a second neighbour's report
	}
	mi, ok := m.members[r.Suspect]
	if !ok {
		return // its key is already gone: the ring change is pending anyway
	}
	reason := fmt.Sprintf("reported by %s: %s", r.Reporter, r.Error)
	m.remove(r.Suspect, mi.Rev, NoticeReported, reason)
}

func (m *Machine) timerFired(ev TimerFired) {
	switch ev.Timer {
	case TimerBootstrap:
		if (m.ring.Epoch != 0 && !m.restarting()) || !m.bootstrapArmed {
			return
		}
		if len(m.members) >= m.minRing {
			m.publish(fmt.Sprintf("bootstrap timer: starting with %d of %d workers", len(m.members), m.spec.Workers))
			return
		}
		// Not even MinRing members: start again at the next member.
		m.bootstrapArmed = false
	case TimerReady:
		if ev.Epoch != m.ring.Epoch || m.started {
			return
		}
		m.readyArmed = 0
		var unready []string
		for _, rm := range m.ring.Members {
			if _, ok := m.ready[rm.ID]; !ok {
				unready = append(unready, rm.ID)
			}
		}
		if len(m.ring.Members)-len(unready) < m.minRing {
			m.wait(fmt.Sprintf("epoch %d: %d of %d members ready, min_ring is %d", m.ring.Epoch,
				len(m.ring.Members)-len(unready), len(m.ring.Members), m.minRing))
			m.armReady()
			return
		}
		for _, id := range unready {
			if mi, ok := m.members[id]; ok {
				m.remove(id, mi.Rev, NoticeNotReady, fmt.Sprintf("not ready for epoch %d within the ready timeout", m.ring.Epoch))
			}
		}
	}
}

// Actions computes what the batch of events since the last call requires
// and returns it, in order.
func (m *Machine) Actions() []Action {
	m.decide()
	out := m.out
	m.out = nil
	return out
}

func (m *Machine) decide() {
	if m.ring.Epoch == 0 || m.restarting() {
		switch {
		case len(m.members) >= m.spec.Workers && m.ring.Epoch == 0:
			m.publish(fmt.Sprintf("initial ring of %d workers", len(m.members)))
		case len(m.members) >= m.spec.Workers:
			m.publish(fmt.Sprintf("restart: every worker of epoch %d is gone; ring of %d workers", m.ring.Epoch, len(m.members)))
		case len(m.members) == 0 && m.ring.Epoch > 0:
			m.wait(fmt.Sprintf("every worker of epoch %d is gone; waiting for %d to register", m.ring.Epoch, m.spec.Workers))
		case len(m.members) > 0 && !m.bootstrapArmed:
			m.bootstrapArmed = true
			m.out = append(m.out, ArmTimer{Timer: TimerBootstrap})
		}
		return
	}
	want := m.wanted()
	if !sameMembers(want, m.ring.Members) || m.reregistered() != "" {
		if len(want) < m.minRing {
			m.wait(fmt.Sprintf("%d member(s), fewer than min_ring %d", len(want), m.minRing))
			return
		}
		m.publish(m.diff(want))
		return
	}
	if m.started {
		return
	}
	if m.readyArmed != m.ring.Epoch {
		m.armReady() // a new leader resuming an unstarted epoch
	}
	if len(m.ready) < len(m.ring.Members) {
		return
	}
	step, source := -1, ""
	for _, rm := range m.ring.Members { // rank order: the lowest rank wins ties
		if s := m.ready[rm.ID]; s > step {
			step, source = s, rm.ID
		}
	}
	sync := false
	for _, rm := range m.ring.Members {
		switch {
		case m.ready[rm.ID] < step: // behind: a joiner, or a rank whose step failed
			sync = true
		case m.prevStarted != nil && !m.prevStarted[rm.ID]: // new, even if at the same step
			sync = true
		case !m.prevKnown: // a new leader cannot tell who is new
			sync = true
		}
	}
	m.started = true
	m.prevStarted, m.prevKnown = ringIDs(m.ring), true
	m.out = append(m.out, PublishStart{Start: job.Start{Epoch: m.ring.Epoch, Step: step, Source: source, Sync: sync}})
}

// wanted is the ring the current members make, in rank order.
func (m *Machine) wanted() []job.RingMember {
	out := make([]job.RingMember, 0, len(m.members))
	for _, id := range sortedKeys(m.members) {
		mb := m.members[id].Member
		out = append(out, job.RingMember{ID: id, Endpoint: mb.Endpoint, Host: mb.Host, LocalEndpoint: mb.LocalEndpoint, Device: mb.Device})
	}
	// Stable: within a host the ids stay sorted.
	slices.SortStableFunc(out, func(a, b job.RingMember) int { return strings.Compare(a.Host, b.Host) })
	return out
}

func (m *Machine) publish(reason string) {
	want := m.wanted()
	m.ring = job.Ring{Epoch: m.ring.Epoch + 1, Members: want, Reason: reason}
	m.ringRevs = map[string]int64{}
	for _, rm := range want {
		m.ringRevs[rm.ID] = m.members[rm.ID].Rev
	}
	m.started = false
	m.ready = map[string]int{}
	m.waiting = ""
	m.bootstrapArmed = false // a later restart of the whole ring arms it again
	m.out = append(m.out, PublishRing{Ring: m.ring})
	m.armReady()
}

func (m *Machine) armReady() {
	m.readyArmed = m.ring.Epoch
	m.out = append(m.out, ArmTimer{Timer: TimerReady, Epoch: m.ring.Epoch})
}

func (m *Machine) wait(reason string) {
	if reason == m.waiting {
		return
	}
	m.waiting = reason
	m.notice(NoticeWaiting, "", reason)
}

// diff names why want differs from the current ring.
func (m *Machine) diff(want []job.RingMember) string {
	old := map[string]string{}
	for _, rm := range m.ring.Members {
		old[rm.ID] = rm.Endpoint
	}
	now := map[string]string{}
	for _, rm := range want {
		now[rm.ID] = rm.Endpoint
	}
	var parts []string
	for _, rm := range m.ring.Members {
		ep, ok := now[rm.ID]
		switch {
		case !ok:
			why := "left (lease expired or key deleted)"
			if rmv, ok := m.removed[rm.ID]; ok {
				why = rmv.reason
			}
			parts = append(parts, rm.ID+" "+why)
		case ep != rm.Endpoint:
			parts = append(parts, fmt.Sprintf("%s moved from %s to %s", rm.ID, rm.Endpoint, ep))
		case m.ringRevs[rm.ID] != 0 && m.members[rm.ID].Rev != m.ringRevs[rm.ID]:
			parts = append(parts, rm.ID+" re-registered (a new process)")
		}
	}
	for _, rm := range want {
		if _, ok := old[rm.ID]; !ok {
			parts = append(parts, rm.ID+" joined")
		}
	}
	return strings.Join(parts, "; ")
}

// reregistered returns a ring member whose key was deleted and created
// again (a restarted process with the same id and endpoint), or "".
// restarting reports whether no worker of the current ring is still there
// as it was (each left, or registered again at a new endpoint): the whole
// job was restarted. The next ring then waits, like the first, for
// JobSpec.Workers members or the bootstrap timer, so a resumed job does
// not start on whichever worker registers first.
func (m *Machine) restarting() bool {
	if m.ring.Epoch == 0 || len(m.ring.Members) == 0 {
		return false
	}
	for _, rm := range m.ring.Members {
		mi, ok := m.members[rm.ID]
		if ok && mi.Member.Endpoint == rm.Endpoint && (m.ringRevs[rm.ID] == 0 || mi.Rev == m.ringRevs[rm.ID]) {
			return false
		}
	}
	return true
}

func (m *Machine) reregistered() string {
	for _, rm := range m.ring.Members {
		if mi, ok := m.members[rm.ID]; ok && m.ringRevs[rm.ID] != 0 && mi.Rev != m.ringRevs[rm.ID] {
			return rm.ID
		}
	}
	return ""
}

func ringIDs(r job.Ring) map[string]bool {
	ids := make(map[string]bool, len(r.Members))
	for _, rm := range r.Members {
		ids[rm.ID] = true
	}
	return ids
}

func sameMembers(a, b []job.RingMember) bool {
	return slices.Equal(a, b)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
