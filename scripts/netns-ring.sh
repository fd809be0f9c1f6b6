#!/usr/bin/env bash
# Measures the ring all-reduce between "hosts" that are Linux network
# namespaces joined by veth pairs on one bridge: every byte goes through the
# kernel's TCP stack and a veth, not the loopback shortcut. Needs root (ip,
# tc). One rank per namespace; `bmojo bench allreduce --hosts ... --wrap "ip
# netns exec ..."` starts them and prints the table, with the plain-TCP
# reference ring measured in the same call (--reference tcp).
#
#   scripts/netns-ring.sh                      # 4 ranks, 64 MiB, links: veth 25g 100g
#   RANKS=4 SIZE=64MiB LINKS="veth 25g" REPEAT=3 scripts/netns-ring.sh [extra bench flags]
#   PER_HOST=2 scripts/netns-ring.sh           # 2 ranks per namespace ("host"): the flat gRPC
#                                              # ring against the hierarchical one (--per-host)
#   PER_HOST=2 BASE=/tmp/bmojo-old scripts/netns-ring.sh
#                                              # and, per link in the same call, the hierarchical
#                                              # run of another build (before/after a change)
#
# LINKS picks the link models, each measured in turn:
#   veth  unshaped veth pairs (as fast as the kernel and CPUs go)
#   25g   every rank's egress shaped by netem to 25 Gbit/s with DELAY (default 25us)
#   100g  the same at 100 Gbit/s
# (a packet crosses one shaped egress per hop, so DELAY is one-way; RTT is 2×DELAY.)
# Where the kernel has no netem qdisc, the rate is shaped with tbf and no
# delay is added; the link's heading says which was used.
# Addresses are 198.18.0.0/24 (RFC 2544's benchmarking range) inside the
# namespaces only; nothing outside this machine is reached. Everything made
# here is removed on exit, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
ranks="${RANKS:-4}"
size="${SIZE:-64MiB}"
links="${LINKS:-veth 25g 100g}"
delay="${DELAY:-25us}"
repeat="${REPEAT:-3}"
iters="${ITERS:-0}"
port="${PORT:-7470}"
per_host="${PER_HOST:-1}" # ranks per namespace; above 1 the flat ring is compared with --per-host
bin="${BMOJO:-bin/bmojo}"
base="${BASE:-}" # with PER_HOST > 1: another build whose hierarchical run is measured too
prefix="bmr$$" # namespace/link names: unique per run, short (IFNAMSIZ is 16)
hub="${prefix}h"

[ "$(id -u)" = 0 ] || { echo "netns-ring: needs root (ip netns, tc)" >&2; exit 1; }
[ $((ranks % per_host)) = 0 ] || { echo "netns-ring: PER_HOST=$per_host must divide RANKS=$ranks" >&2; exit 1; }
nhosts=$((ranks / per_host))
[ -x "$bin" ] || { echo "netns-ring: $bin missing: CGO_ENABLED=0 go build -o bin/bmojo ./cmd/bmojo" >&2; exit 1; }
bin="$(realpath "$bin")"
if [ -n "$base" ]; then
	[ -x "$base" ] || { echo "netns-ring: BASE=$base is not an executable" >&2; exit 1; }
	base="$(realpath "$base")"
fi

cleanup() {
	for i in $(seq 0 $((nhosts - 1))); do ip netns del "${prefix}r$i" 2>/dev/null || true; done
	ip netns del "$hub" 2>/dev/null || true
	rm -f "${enter:-}"
}
trap cleanup EXIT INT TERM

ip netns add "$hub"
ip -n "$hub" link add br0 type bridge
ip -n "$hub" link set br0 up
hosts=()
for i in $(seq 0 $((nhosts - 1))); do
	ns="${prefix}r$i"
	ip netns add "$ns"
	ip link add "${prefix}v$i" type veth peer name "${prefix}p$i"
	ip link set "${prefix}v$i" netns "$ns"
	ip link set "${prefix}p$i" netns "$hub"
	ip -n "$ns" link set "${prefix}v$i" name eth0
	ip -n "$ns" addr add "198.18.0.$((i + 1))/24" dev eth0
	ip -n "$ns" link set eth0 up
	ip -n "$ns" link set lo up
	ip -n "$hub" link set "${prefix}p$i" master br0
	ip -n "$hub" link set "${prefix}p$i" up
	for l in $(seq 0 $((per_host - 1))); do hosts+=("198.18.0.$((i + 1)):$((port + l))"); done
done
hostlist="$(IFS=,; echo "${hosts[*]}")"
# enter RANK CMD...: runs CMD in rank RANK's namespace (RANK/PER_HOST).
enter="$(mktemp /tmp/netns-ring-enter.XXXXXX)"
printf '#!/bin/sh\nr=$1; shift\nexec ip netns exec %sr$((r / %d)) "$@"\n' "$prefix" "$per_host" >"$enter"
chmod +x "$enter"

shaped_by=""
shape() { # shape RATE: netem (delay + rate) on every rank's egress, or nothing for ""
	shaped_by=""
	for i in $(seq 0 $((nhosts - 1))); do
		tc -n "${prefix}r$i" qdisc del dev eth0 root 2>/dev/null || true
		[ -n "$1" ] || continue
		# limit: enough packets for the delay-bandwidth product with GSO segments
		if tc -n "${prefix}r$i" qdisc add dev eth0 root netem delay "$delay" rate "$1" limit 10000 2>/dev/null; then
			shaped_by="netem: rate $1, one-way delay $delay per hop"
		else
			# Kernels without sch_netem (e.g. this Firecracker VM's): shape
			# the rate with tbf; no delay can be added then, and we say so.
			tc -n "${prefix}r$i" qdisc add dev eth0 root tbf rate "$1" burst 4mb latency 10ms
			shaped_by="tbf: rate $1; NO added delay (this kernel has no netem qdisc)"
		fi
	done
}

echo "# $(date -u +%FT%TZ) $(uname -srm); $(nproc) CPUs; $ranks ranks, $per_host per network namespace, namespaces on a veth bridge; size $size"
for link in $links; do
	case "$link" in
	veth) shape "" ;;
	25g) shape 25gbit ;;
	100g) shape 100gbit ;;
	*) echo "netns-ring: unknown link $link (veth, 25g, 100g)" >&2; exit 1 ;;
	esac
	echo "== link $link${shaped_by:+ ($shaped_by)}"
	if [ "$per_host" = 1 ]; then
		"$bin" bench allreduce --ranks "$ranks" --sizes "$size" --iters "$iters" --log-level error \
			--hosts "$hostlist" --wrap "ip netns exec ${prefix}r{rank}" \
			--transport grpc --reference tcp --repeat "$repeat" "$@"
		continue
	fi
	# Several ranks per namespace: the flat gRPC ring (every hop over TCP;
	# rank i in namespace i/PER_HOST, which enter-ns works out), then the
	# hierarchical one (shared memory inside a namespace).
	echo "-- flat gRPC ring ($bin)"
	"$bin" bench allreduce --ranks "$ranks" --sizes "$size" --iters "$iters" --log-level error \
		--hosts "$hostlist" --wrap "$enter {rank}" \
		--transport grpc --repeat "$repeat" "$@"
	for b in "$bin" ${base:+"$base"}; do
		echo "-- hierarchical, --per-host $per_host ($b)"
		"$b" bench allreduce --ranks "$ranks" --sizes "$size" --iters "$iters" --log-level error \
			--hosts "$hostlist" --wrap "ip netns exec ${prefix}r{host}" \
			--transport grpc --repeat "$repeat" --per-host "$per_host" "$@"
	done
done
