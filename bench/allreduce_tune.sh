#!/usr/bin/env bash
# Measures bmojo's transport choices one at a time at one size (default: 4
# ranks, 256 MiB): connections per neighbour, chunk size, flow-control window
# and gRPC read and write buffers, for float32 and bf16 on the wire. Each line
# is one run of `bmojo bench allreduce` with the defaults plus the flags shown.
#
#   bench/allreduce_tune.sh 4 256MiB          # the full grid
#   GRID=short bench/allreduce_tune.sh 4 256MiB
set -uo pipefail
cd "$(dirname "$0")/.."
ranks="${1:-4}"
size="${2:-256MiB}"
bin="${BMOJO:-bin/bmojo}"
run() {
	printf '%-40s ' "$*"
	"$bin" bench allreduce --ranks "$ranks" --sizes "$size" --iters "${ITERS:-8}" --log-level error "$@" 2>&1 |
		awk '/^ *[0-9]+[KMG]iB /{print "time_us", $4, "busbw", $7} /rror|panic/{print}'
}
for wire in "" --bf16; do
	run $wire
	for s in 1 2 4 16; do run $wire --streams "$s"; done
	for c in 64KiB 1MiB 4MiB; do run $wire --chunk "$c"; done
	[ "${GRID:-full}" = short ] && continue
	for w in 4MiB 128MiB; do run $wire --window "$w"; done
	for b in 64KiB 1MiB; do run $wire --rbuf "$b"; done
	for b in 0 64KiB 4MiB; do run $wire --wbuf "$b"; done
done
