package worker

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bmojo/bmojo/internal/golden"
	"github.com/bmojo/bmojo/job"
)

// TestMachineScripts runs the golden scripts in testdata/ (internal/golden
// has the format, as for the coordinator's; -rewrite regenerates them): the
// "> " lines of a block are events applied in order, the other lines the
// actions Machine.Actions returns after them, one per line.
//
// Commands (E an epoch, S a step; the clock starts at 0 and only moves when
// an event says so):
//
//	> worker id=ID steps=N [eval_every=K] [checkpoint_every=K] [step=S]
//	                                      a new machine, endpoint ID:7000
//	> registered                          the member key is written
//	> ring E ID[@HOST:PORT],... [rev=R]   a ring record (endpoint ID:7000 unless given;
//	                                      mod revision 100·E unless given)
//	> start E step=S [sync source=ID]     a start record
//	> connected E step=S                  Connect ended (clock +1s)
//	> stepdone E step=S                   Train ended (clock +1s)
//	> evaldone E step=S val=V             Evaluate ended (clock +1s)
//	> failed E [suspect=ID]               the work in flight failed in its collective
//	> done                                the done record
//	> tick +DURATION                      the clock moves on; health is re-derived
func TestMachineScripts(t *testing.T) {
	golden.Run(t, "testdata", func(t *testing.T) golden.Script { return &harness{t: t, now: time.Unix(0, 0)} })
}

type harness struct {
	t   *testing.T
	m   *Machine
	now time.Time
}

// Do applies one command.
func (h *harness) Do(f []string, line string) { h.do(f, line) }

// Output renders the machine's actions.
func (h *harness) Output() []string {
	if h.m == nil {
		return nil
	}
	var got []string
	for _, a := range h.m.Actions() {
		got = append(got, render(a))
	}
	return got
}

func (h *harness) do(f []string, line string) {
	t := h.t
	fail := func(format string, args ...any) { t.Fatalf("%s: "+format, append([]any{line}, args...)...) }
	atoi := func(s string) int {
		n, err := strconv.Atoi(s)
		if err != nil {
			fail("%v", err)
		}
		return n
	}
	kv := map[string]string{}
	var pos []string
	for _, a := range f[1:] {
		if k, v, ok := strings.Cut(a, "="); ok {
			kv[k] = v
		} else {
			pos = append(pos, a)
		}
	}
	epoch := func() uint64 {
		if len(pos) == 0 {
			fail("no epoch")
		}
		return uint64(atoi(pos[0]))
	}
	if f[0] != "worker" && h.m == nil {
		fail("no worker yet")
	}
	tick := func() time.Time { h.now = h.now.Add(time.Second); return h.now }
	switch f[0] {
	case "worker":
		c := MachineConfig{ID: kv["id"], Endpoint: kv["id"] + ":7000", Steps: atoi(kv["steps"])}
		if v, ok := kv["eval_every"]; ok {
			c.EvalEvery = atoi(v)
		}
		if v, ok := kv["checkpoint_every"]; ok {
			c.CheckpointEvery = atoi(v)
		}
		if v, ok := kv["step"]; ok {
			c.Step = atoi(v)
		}
		m, err := NewMachine(c)
		if err != nil {
			fail("%v", err)
		}
		h.m = m
	case "registered":
		h.m.Step(Registered{At: h.now})
	case "ring":
		r := job.Ring{Epoch: epoch()}
		for _, id := range strings.Split(pos[1], ",") {
			id, ep, ok := strings.Cut(id, "@")
			if !ok {
				ep = id + ":7000"
			}
			r.Members = append(r.Members, job.RingMember{ID: id, Endpoint: ep})
		}
		rev := int64(100 * r.Epoch)
		if v, ok := kv["rev"]; ok {
			rev = int64(atoi(v))
		}
		h.m.Step(RingSeen{Ring: r, Rev: rev})
	case "start":
		st := job.Start{Epoch: epoch(), Step: atoi(kv["step"]), Source: kv["source"]}
		st.Sync = len(pos) > 1 && pos[1] == "sync"
		h.m.Step(StartSeen{Start: st})
	case "connected":
		h.m.Step(Connected{Epoch: epoch(), Step: atoi(kv["step"]), At: tick()})
	case "stepdone":
		h.m.Step(StepDone{Epoch: epoch(), Step: atoi(kv["step"]), At: tick()})
	case "evaldone":
		v, err := strconv.ParseFloat(kv["val"], 64)
		if err != nil {
			fail("%v", err)
		}
		h.m.Step(EvalDone{Epoch: epoch(), Step: atoi(kv["step"]), Val: v, At: tick()})
	case "failed":
		h.m.Step(Failed{Epoch: epoch(), Suspect: kv["suspect"], Err: "recv: connection reset"})
	case "done":
		h.m.Step(DoneSeen{})
	case "tick":
		d, err := time.ParseDuration(strings.TrimPrefix(pos[0], "+"))
		if err != nil {
			fail("%v", err)
		}
		h.now = h.now.Add(d)
		h.m.Step(Tick{Now: h.now})
	default:
		fail("unknown command")
	}
}

func render(a Action) string {
	switch a := a.(type) {
	case CloseRing:
		return "close-ring"
	case PutReady:
		return fmt.Sprintf("ready %d step=%d", a.Epoch, a.Step)
	case Connect:
		s := fmt.Sprintf("connect %d rank=%d step=%d", a.Start.Epoch, a.Rank, a.Start.Step)
		if a.Start.Sync {
			s += " sync source=" + a.Start.Source
		}
		return s
	case Train:
		return fmt.Sprintf("train %d", a.Epoch)
	case Evaluate:
		return fmt.Sprintf("evaluate %d", a.Epoch)
	case Record:
		s := fmt.Sprintf("record %d step=%d", a.Epoch, a.Step)
		if !a.Primary {
			s += " backup"
		}
		return s
	case Fence:
		return fmt.Sprintf("fence %d rev=%d", a.Epoch, a.Rev)
	case Progress:
		return fmt.Sprintf("progress step=%d val=%g", a.Step, a.Val)
	case Checkpoint:
		return fmt.Sprintf("checkpoint %d step=%d val=%g", a.Epoch, a.Step, a.Val)
	case Report:
		return fmt.Sprintf("report %d suspect=%s", a.Epoch, a.Suspect)
	case Finish:
		return fmt.Sprintf("finish step=%d val=%g", a.Step, a.Val)
	case SetHealth:
		return fmt.Sprintf("health ready=%v live=%v %q", a.Ready, a.Live, a.Reason)
	case Exit:
		return "exit"
	case Fatal:
		return "fatal: " + a.Err.Error()
	}
	return fmt.Sprintf("unknown %T", a)
}

// TestMachineRefusesBadConfig: the machine needs an id, an endpoint and a
// step within the job.
func TestMachineRefusesBadConfig(t *testing.T) {
	for _, c := range []MachineConfig{{}, {ID: "w", Endpoint: "e", Steps: 0}, {ID: "w", Endpoint: "e", Steps: 3, Step: 4}} {
		if _, err := NewMachine(c); err == nil {
			t.Errorf("%+v accepted", c)
		}
	}
	if _, err := NewMachine(MachineConfig{ID: "w", Endpoint: "e", Steps: 3, Step: 3}); err != nil {
		t.Error(errors.Unwrap(err))
	}
}
