#!/usr/bin/env bash
# The paths between hosts between network namespaces, several builds and
# transports in one call: per link, scripts/netns-ring.sh (every rank in its
# own namespace on a veth bridge, the plain-TCP ring measured alternately in
# each launch: --reference tcp) for this build's data sockets and gRPC
# streams and, with BASE, another build's gRPC streams; then the busbw ratios
# to the TCP ring and the CPU per collective of each. Needs root.
#
#   CGO_ENABLED=0 go build -o bin/bmojo ./cmd/bmojo
#   BASE=/tmp/bmojo-old LINKS="veth 25g" REPEAT=3 ITERS=6 bench/allreduce_netns.sh
#
# RANKS, SIZE, LINKS (default "veth 25g"), REPEAT, ITERS go to
# scripts/netns-ring.sh; TRANSPORTS (default "socket grpc"); BMOJO (bin/bmojo).
set -uo pipefail
cd "$(dirname "$0")/.."
links="${LINKS:-veth 25g}"
transports="${TRANSPORTS:-socket grpc}"
bin="${BMOJO:-bin/bmojo}"
base="${BASE:-}"
out="$(mktemp -d /tmp/allreduce-netns.XXXXXX)"
summary="$out/summary.txt"
: >"$summary"
for link in $links; do
	runs=()
	for t in $transports; do runs+=("$bin:$t"); done
	[ -n "$base" ] && runs+=("$base:grpc")
	for r in "${runs[@]}"; do
		b="${r%:*}" t="${r##*:}"
		f="$out/$link.$(basename "$b").$t.txt"
		echo "== link $link: $b --transport $t"
		BMOJO="$b" LINKS="$link" scripts/netns-ring.sh --transport "$t" "$@" 2>&1 | tee "$f"
		awk -v l="$link" -v b="$b" -v t="$t" '
			/^# cpu\(ms\)/ { c[++n] = $NF }
			/^#[ \t]+[0-9]+[KMG]iB[ \t]+[0-9.]+[ \t]+[0-9.]+[ \t]+[0-9.]+$/ { x = $3; y = $4; q = $5 }
			END { printf "%-6s %-28s %-7s %8s %8s %6s %9s %9s\n", l, b, t, x, y, q, c[1], c[2] }' "$f" >>"$summary"
	done
done
echo "== busbw GB/s of the path and of the TCP ring in the same launches (medians), their ratio, CPU ms per collective of each"
printf '%-6s %-28s %-7s %8s %8s %6s %9s %9s\n' link build path busbw tcp ratio cpu cpu_tcp
cat "$summary"
