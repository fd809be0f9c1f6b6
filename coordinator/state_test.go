package coordinator

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/bmojo/bmojo/internal/golden"
	"github.com/bmojo/bmojo/job"
)

// TestMachineScripts runs the golden scripts in testdata/ (internal/golden
// has the format; -rewrite regenerates them): the "> " lines of a block are
// events applied in order as one batch, the other lines the actions
// Machine.Actions must return after them, one per line.
//
// Commands:
//
//	> spec workers=N [min_ring=M]                  a new machine (hash h, code c, protocol 1), no members
//	> join ID[,ep=HOST:PORT][,host=H][,rev=R][,spec=S][,code=C][,proto=P][,bad] ...
//	                                               add or replace members; send the member set
//	> leave ID ...                                 delete member keys; send the member set
//	> sync                                         send the member set as it is
//	> ready EPOCH ID=STEP ...                      ready records
//	> report REPORTER SUSPECT [epoch=E]            a report (default epoch: the current ring's)
//	> timer bootstrap | timer ready EPOCH          a timer fired
//	> leader [ring=E:ID,ID...] [start=E:STEP:SRC]  leadership gained with this persisted state,
//	                                               followed by the member set
//
// The harness applies DeleteMember actions to its member set, as etcd would;
// the machine sees that at the next member event.
func TestMachineScripts(t *testing.T) {
	golden.Run(t, "testdata", func(t *testing.T) golden.Script {
		return &harness{t: t, members: map[string]MemberInfo{}}
	})
}

type harness struct {
	t       *testing.T
	m       *Machine
	members map[string]MemberInfo
	rev     int64
}

// Do applies one command.
func (h *harness) Do(f []string, line string) { h.do(f, line) }

// Output renders the machine's actions, applying DeleteMember actions to
// the harness's member set as etcd would (the machine sees that at the
// next member event).
func (h *harness) Output() []string {
	if h.m == nil {
		return nil
	}
	var got []string
	for _, a := range h.m.Actions() {
		got = append(got, h.render(a))
		if d, ok := a.(DeleteMember); ok {
			if mi, ok := h.members[d.ID]; ok && mi.Rev == d.Rev {
				delete(h.members, d.ID)
			}
		}
	}
	return got
}

func (h *harness) do(f []string, line string) {
	t := h.t
	fail := func(format string, args ...any) { t.Fatalf("%s: "+format, append([]any{line}, args...)...) }
	kv := func(s string) (string, string) { k, v, _ := strings.Cut(s, "="); return k, v }
	atoi := func(s string) int {
		n, err := strconv.Atoi(s)
		if err != nil {
			fail("%v", err)
		}
		return n
	}
	if f[0] != "spec" && h.m == nil {
		fail("no spec yet")
	}
	switch f[0] {
	case "spec":
		spec := job.Spec{Protocol: 1, Hash: "h", CodeHash: "c"}
		for _, a := range f[1:] {
			switch k, v := kv(a); k {
			case "workers":
				spec.Workers = atoi(v)
			case "min_ring":
				spec.MinRing = atoi(v)
			default:
				fail("unknown %s", k)
			}
		}
		m, err := NewMachine(spec)
		if err != nil {
			fail("%v", err)
		}
		h.m = m
		h.members = map[string]MemberInfo{}
	case "join":
		for _, a := range f[1:] {
			parts := strings.Split(a, ",")
			h.rev++
			mi := MemberInfo{Rev: h.rev, Member: job.Member{ID: parts[0], Endpoint: parts[0] + ":7000",
				SpecHash: "h", CodeHash: "c", Protocol: 1}}
			for _, p := range parts[1:] {
				switch k, v := kv(p); k {
				case "ep":
					mi.Member.Endpoint = v
				case "host":
					mi.Member.Host, mi.Member.LocalEndpoint = v, parts[0]+":7001"
				case "rev":
					mi.Rev = int64(atoi(v))
				case "spec":
					mi.Member.SpecHash = v
				case "code":
					mi.Member.CodeHash = v
				case "proto":
					mi.Member.Protocol = atoi(v)
				case "bad":
					mi.Err = errors.New("unexpected end of JSON input")
				default:
					fail("unknown %s", k)
				}
			}
			h.members[mi.Member.ID] = mi
		}
		h.sendMembers()
	case "leave":
		for _, id := range f[1:] {
			delete(h.members, id)
		}
		h.sendMembers()
	case "sync":
		h.sendMembers()
	case "ready":
		epoch := uint64(atoi(f[1]))
		for _, a := range f[2:] {
			id, v := kv(a)
			h.m.Step(ReadySeen{ID: id, Ready: job.Ready{Epoch: epoch, Step: atoi(v)}})
		}
	case "report":
		h.rev++
		r := job.Report{Epoch: h.m.Ring().Epoch, Reporter: f[1], Suspect: f[2], Error: "recv: connection reset"}
		for _, a := range f[3:] {
			if k, v := kv(a); k == "epoch" {
				r.Epoch = uint64(atoi(v))
			}
		}
		h.m.Step(ReportSeen{Key: job.KeyReports + f[1], Rev: h.rev, Report: r})
	case "timer":
		ev := TimerFired{Timer: Timer(f[1])}
		if len(f) > 2 {
			ev.Epoch = uint64(atoi(f[2]))
		}
		h.m.Step(ev)
	case "leader":
		var ev LeaderElected
		for _, a := range f[1:] {
			k, v := kv(a)
			p := strings.Split(v, ":")
			switch k {
			case "ring":
				r := job.Ring{Epoch: uint64(atoi(p[0]))}
				for _, id := range strings.Split(p[1], ",") {
					r.Members = append(r.Members, job.RingMember{ID: id, Endpoint: id + ":7000"})
				}
				ev.Ring = &r
			case "start":
				ev.Start = &job.Start{Epoch: uint64(atoi(p[0])), Step: atoi(p[1]), Source: p[2]}
			default:
				fail("unknown %s", k)
			}
		}
		h.m.Step(ev)
		h.sendMembers()
	default:
		fail("unknown command")
	}
}

func (h *harness) sendMembers() {
	var list []MemberInfo
	for _, id := range sortedKeys(h.members) {
		list = append(list, h.members[id])
	}
	h.m.Step(MembersChanged{Members: list})
}

func (h *harness) render(a Action) string {
	switch a := a.(type) {
	case PublishRing:
		var ms []string
		for _, rm := range a.Ring.Members {
			s := rm.ID
			if rm.Endpoint != rm.ID+":7000" {
				s += "@" + rm.Endpoint
			}
			if rm.Host != "" {
				s += "(" + rm.Host + ")"
			}
			ms = append(ms, s)
		}
		return fmt.Sprintf("ring %d [%s] %q", a.Ring.Epoch, strings.Join(ms, " "), a.Ring.Reason)
	case PublishStart:
		s := fmt.Sprintf("start %d step=%d source=%s", a.Start.Epoch, a.Start.Step, a.Start.Source)
		if a.Start.Sync {
			s += " sync"
		}
		return s
	case DeleteMember:
		return fmt.Sprintf("delete members/%s rev=%d %q", a.ID, a.Rev, a.Reason)
	case DeleteReport:
		return fmt.Sprintf("delete %s rev=%d", a.Key, a.Rev)
	case ArmTimer:
		if a.Timer == TimerBootstrap {
			return "arm bootstrap"
		}
		return fmt.Sprintf("arm %s %d", a.Timer, a.Epoch)
	case Notice:
		id := a.WorkerID
		if id == "" {
			id = "-"
		}
		return fmt.Sprintf("notice %s %s epoch=%d %q", a.Kind, id, a.Epoch, a.Reason)
	}
	h.t.Fatalf("unknown action %T", a)
	return ""
}

func TestNewMachineBadSpec(t *testing.T) {
	for _, tc := range []struct {
		name string
		spec job.Spec
	}{
		{"no workers", job.Spec{Workers: 0}},
		{"min ring above workers", job.Spec{Workers: 2, MinRing: 3}},
		{"negative min ring", job.Spec{Workers: 2, MinRing: -1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewMachine(tc.spec); !errors.Is(err, ErrBadSpec) {
				t.Fatalf("NewMachine(%+v) = %v, want ErrBadSpec", tc.spec, err)
			}
		})
	}
}
