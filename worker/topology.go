package worker

import (
	"fmt"

	"github.com/bmojo/bmojo/job"
)

// layout is how a ring's members sit on hosts, for the hierarchical
// all-reduce: Hosts hosts of PerHost members each, each host's members
// contiguous in rank order, so member g is local rank g mod PerHost of
// host g / PerHost (allreduce.Hier's host-major numbering).
type layout struct{ Hosts, PerHost int }

// hierLayout says whether a ring's members can reduce hierarchically: two
// or more hosts, every one with the same number (two or more) of members,
// each host's members next to each other (the coordinator ranks them so),
// and every member with a host and a local endpoint. why says what rules
// it out ("" when nothing does).
func hierLayout(members []job.RingMember) (l layout, why string) {
	var hosts []string
	count := map[string]int{}
	for i, m := range members {
		switch {
		case m.Host == "":
			return layout{}, fmt.Sprintf("member %s (rank %d) has no host", m.ID, i)
		case m.LocalEndpoint == "":
			return layout{}, fmt.Sprintf("member %s (rank %d) has no local endpoint (an older build)", m.ID, i)
		}
		if i == 0 || members[i-1].Host != m.Host {
			if count[m.Host] > 0 {
				return layout{}, fmt.Sprintf("the members of host %s are not next to each other in the ring (rank %d)", m.Host, i)
			}
			hosts = append(hosts, m.Host)
		}
		count[m.Host]++
	}
	switch {
	case len(hosts) < 2:
		return layout{}, "the ring spans one host"
	}
	per := count[hosts[0]]
	for _, h := range hosts[1:] {
		if count[h] != per {
			return layout{}, fmt.Sprintf("hosts hold different numbers of members (%s %d, %s %d)", hosts[0], per, h, count[h])
		}
	}
	if per < 2 {
		return layout{}, "one member per host"
	}
	return layout{Hosts: len(hosts), PerHost: per}, ""
}

// subRings are the ring ranks (indexes into the ring's members) of rank's
// local ring (its host's members, local rank order) and of its cross-host
// ring (the members with its local index, host order), and rank's place in
// each.
func (l layout) subRings(rank int) (local, cross []int, localRank, crossRank int) {
	host, idx := rank/l.PerHost, rank%l.PerHost
	for i := range l.PerHost {
		local = append(local, host*l.PerHost+i)
	}
	for h := range l.Hosts {
		cross = append(cross, h*l.PerHost+idx)
	}
	return local, cross, idx, host
}
