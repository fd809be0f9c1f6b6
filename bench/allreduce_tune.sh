#!/usr/bin/env bash
# Measures bmojo's transport choices one at a time at one size (default: 4
# ranks, 256 MiB), for float32 and bf16 on the wire. Each line is one run of
# `bmojo bench allreduce` with the defaults plus the flags shown.
#   gRPC data path (--transport grpc): connections per neighbour, chunk size,
#     flow-control window, gRPC read and write buffers;
#   same-host shared-memory path (--transport auto): rings (queues) per
#     neighbour, slots per ring, chunk size.
#
#   bench/allreduce_tune.sh 4 256MiB          # the full grid
#   GRID=short bench/allreduce_tune.sh 4 256MiB
#   GRID=shm bench/allreduce_tune.sh 4 256MiB # the shared-memory knobs only
set -uo pipefail
cd "$(dirname "$0")/.."
ranks="${1:-4}"
size="${2:-256MiB}"
bin="${BMOJO:-bin/bmojo}"
grid="${GRID:-full}"
run() {
	printf '%-48s ' "$*"
	"$bin" bench allreduce --ranks "$ranks" --sizes "$size" --iters "${ITERS:-8}" --log-level error "$@" 2>&1 |
		awk '/^ *[0-9]+[KMG]iB /{print "time_us", $4, "busbw", $7} /rror|panic/{print}'
}
for wire in "" --bf16; do
	run --transport auto $wire
	for q in 1 2 8 16; do run --transport auto $wire --shm-queues "$q"; done
	for s in 4 16; do run --transport auto $wire --shm-slots "$s"; done
	for c in 64KiB 1MiB; do run --transport auto $wire --chunk "$c"; done
	[ "$grid" = shm ] && continue
	run --transport grpc $wire
	for s in 1 2 4 16; do run --transport grpc $wire --streams "$s"; done
	for c in 64KiB 1MiB 4MiB; do run --transport grpc $wire --chunk "$c"; done
	[ "$grid" = short ] && continue
	for w in 4MiB 128MiB; do run --transport grpc $wire --window "$w"; done
	for b in 64KiB 1MiB; do run --transport grpc $wire --rbuf "$b"; done
	for b in 0 64KiB 4MiB; do run --transport grpc $wire --wbuf "$b"; done
done
