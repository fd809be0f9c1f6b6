package worker

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/job"
)

// members builds ring members from "id@host" (host "" for none), each with
// a local endpoint.
func members(specs ...string) []job.RingMember {
	var out []job.RingMember
	for _, s := range specs {
		id, host, _ := strings.Cut(s, "@")
		out = append(out, job.RingMember{ID: id, Endpoint: id + ":7000", Host: host, LocalEndpoint: id + ":7001"})
	}
	return out
}

// TestHierLayout: which rings reduce hierarchically, and why the others do
// not (the worker logs the reason when the job asks for hier).
func TestHierLayout(t *testing.T) {
	noLocal := members("a@h1", "b@h1", "c@h2", "d@h2")
	noLocal[2].LocalEndpoint = ""
	for _, tc := range []struct {
		name    string
		members []job.RingMember
		want    layout
		why     string
	}{
		{"2 hosts x 2", members("a@h1", "b@h1", "c@h2", "d@h2"), layout{2, 2}, ""},
		{"3 hosts x 2", members("a@h1", "b@h1", "c@h2", "d@h2", "e@h3", "f@h3"), layout{3, 2}, ""},
		{"2 hosts x 3", members("a@h1", "b@h1", "c@h1", "d@h2", "e@h2", "f@h2"), layout{2, 3}, ""},
		{"one host", members("a@h1", "b@h1", "c@h1"), layout{}, "one host"},
		{"one member per host", members("a@h1", "b@h2", "c@h3"), layout{}, "one member per host"},
		{"unbalanced (a worker died)", members("a@h1", "c@h2", "d@h2"), layout{}, "different numbers"},
		{"interleaved", members("a@h1", "c@h2", "b@h1", "d@h2"), layout{}, "not next to each other"},
		{"no host", members("a@h1", "b@", "c@h2", "d@h2"), layout{}, "member b (rank 1) has no host"},
		{"no local endpoint", noLocal, layout{}, "member c (rank 2) has no local endpoint"},
		{"one member", members("a@h1"), layout{}, "one host"},
		{"empty", nil, layout{}, "one host"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, why := hierLayout(tc.members)
			if got != tc.want || (tc.why == "") != (why == "") || !strings.Contains(why, tc.why) {
				t.Fatalf("got %+v %q, want %+v %q", got, why, tc.want, tc.why)
			}
		})
	}
}

// TestSubRings: every rank of 3 hosts × 2 is in exactly one local ring
// (its host's members) and one cross ring (its local index on every host),
// at the place allreduce.Hier numbers it by (host-major).
func TestSubRings(t *testing.T) {
	l := layout{Hosts: 3, PerHost: 2}
	want := map[int]string{
		0: "local [0 1] @0, cross [0 2 4] @0",
		1: "local [0 1] @1, cross [1 3 5] @0",
		2: "local [2 3] @0, cross [0 2 4] @1",
		5: "local [4 5] @1, cross [1 3 5] @2",
	}
	for rank := range 6 {
		local, cross, lr, cr := l.subRings(rank)
		if local[lr] != rank || cross[cr] != rank || cr*l.PerHost+lr != rank {
			t.Errorf("rank %d is not at its place: local %v @%d, cross %v @%d", rank, local, lr, cross, cr)
		}
		got := fmt.Sprintf("local %v @%d, cross %v @%d", local, lr, cross, cr)
		if w, ok := want[rank]; ok && got != w {
			t.Errorf("rank %d: %s, want %s", rank, got, w)
		}
		if slices.Contains(local, (rank+l.PerHost)%6) {
			t.Errorf("rank %d's local ring holds a member of another host: %v", rank, local)
		}
	}
}

// TestSetDataPath: the data path each ring gets, from the ring record alone
// (so every rank decides the same), the worker's flags and whether its
// backend has device memory for a GPU-resident ring.
func TestSetDataPath(t *testing.T) {
	gpu := func(host string) job.RingMember { return job.RingMember{Host: host, Device: "NVIDIA H100 GPU-1"} }
	cpu := func(host string) job.RingMember { return job.RingMember{Host: host, Device: "cpu"} }
	dm := struct{ allreduce.DeviceMem }{} // never called: only its presence matters
	def := allreduce.Default()
	cases := []struct {
		name              string
		ms                []job.RingMember
		flat              bool
		dm                allreduce.DeviceMem
		sockets, hostRing bool
		want              string
		device            bool
	}{
		{"cpu, one host", []job.RingMember{cpu("a"), cpu("a")}, true, nil, true, false, allreduce.TransportAuto, false},
		{"cpu, two hosts", []job.RingMember{cpu("a"), cpu("b")}, true, nil, true, false, allreduce.TransportSocket, false},
		{"cpu, two hosts, no sockets", []job.RingMember{cpu("a"), cpu("b")}, true, nil, false, false, allreduce.TransportAuto, false},
		{"cpu, a member without a host", []job.RingMember{cpu("a"), cpu("")}, true, nil, true, false, allreduce.TransportSocket, false},
		{"gpus, one host", []job.RingMember{gpu("a"), gpu("a")}, true, dm, true, false, allreduce.TransportCUDAIPC, true},
		{"gpus, one member on the cpu", []job.RingMember{gpu("a"), cpu("a")}, true, dm, true, false, allreduce.TransportAuto, false},
		{"gpus, a member of an older coordinator", []job.RingMember{gpu("a"), {Host: "a"}}, true, dm, true, false, allreduce.TransportAuto, false},
		{"gpus, --host-ring", []job.RingMember{gpu("a"), gpu("a")}, true, dm, true, true, allreduce.TransportAuto, false},
		{"gpus, no device memory here", []job.RingMember{gpu("a"), gpu("a")}, true, nil, true, false, allreduce.TransportAuto, false},
		{"gpus, flat over two hosts", []job.RingMember{gpu("a"), gpu("b")}, true, dm, true, false, allreduce.TransportSocket, false},
		{"gpus, a hierarchy's ring inside a host", []job.RingMember{gpu("a"), gpu("a"), gpu("b"), gpu("b")}, false, dm, true, false, allreduce.TransportCUDAIPC, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := def
			setDataPath(&cfg, c.ms, c.flat, c.dm, c.sockets, c.hostRing)
			if cfg.Transport != c.want || (cfg.Device != nil) != c.device {
				t.Fatalf("transport %q, device %v; want %q, device %v", cfg.Transport, cfg.Device != nil, c.want, c.device)
			}
			wantChunk := def.ChunkBytes
			if c.device {
				wantChunk = deviceChunkBytes
			}
			if cfg.ChunkBytes != wantChunk {
				t.Fatalf("chunk %d bytes, want %d", cfg.ChunkBytes, wantChunk)
			}
		})
	}
}
