#!/usr/bin/env bash
# Runs bmojo's ring all-reduce (gRPC data path, same-host shared-memory data
# path, shared memory with bf16 on the wire) and PyTorch's Gloo all-reduce
# with the same ranks and sizes on this machine, one after the other, writes
# every table (and the machine's description) to $OUT (default ./out) and
# ends with a summary at 256 MiB (or the largest size, if smaller).
#
#   CGO_ENABLED=0 go build -o bin/bmojo ./cmd/bmojo     # on the dev machine
#   bench/allreduce_compare.sh 4 1GiB                    # on the GPU machine
#
# Extra arguments after the first two go to every bmojo run (e.g. --chunk
# 1MiB); they come after the script's own flags, so they override them.
set -uo pipefail
cd "$(dirname "$0")/.."
ranks="${1:-4}"
size="${2:-1GiB}"
shift 2 || true
out="${OUT:-out}"
mkdir -p "$out"
bin="${BMOJO:-bin/bmojo}"

{
	echo "# $(date -u +%FT%TZ) $(uname -srm); $(nproc) CPUs"
	grep -m1 'model name' /proc/cpuinfo || true
	df -h /dev/shm 2>/dev/null | tail -1 | awk '{print "# /dev/shm", $2, "size,", $4, "free"}'
	python3 -c 'import torch; print("# torch", torch.__version__)' 2>&1
} | tee "$out/machine.txt"

bmojo() {
	local name="$1"
	shift
	echo "== bmojo $name"
	"$bin" bench allreduce --ranks "$ranks" --size "$size" --log-level error "$@" 2>&1 | tee "$out/bmojo_$name.txt"
}
bmojo f32_grpc --transport grpc "$@"
bmojo f32_shm --transport auto "$@"
bmojo bf16_shm --transport auto --bf16 "$@"
echo "== gloo"
PYTHONUNBUFFERED=1 python3 bench/gloo_allreduce.py --ranks "$ranks" --size "$size" 2>&1 | tee "$out/gloo.txt"

# Summary: busbw at 256 MiB (the issue's figure), and each against Gloo.
row=256MiB
grep -q "^ *$row " "$out/bmojo_f32_grpc.txt" || row="$(awk '/^ *[0-9]+[KMG]iB /{s=$1} END{print s}' "$out/bmojo_f32_grpc.txt")"
busbw() { awk -v r="$row" '$1 == r {print $7}' "$1" 2>/dev/null; }
gloo="$(busbw "$out/gloo.txt")"
{
	echo "== busbw at $row, $ranks ranks (GB/s; x = times Gloo's)"
	for f in f32_grpc f32_shm bf16_shm; do
		b="$(busbw "$out/bmojo_$f.txt")"
		awk -v n="bmojo $f" -v b="$b" -v g="$gloo" 'BEGIN{ if (b == "" || g == "" || g == 0) printf "%-16s %s\n", n, (b == "" ? "missing" : b); else printf "%-16s %7.3f  %.2fx\n", n, b, b / g }'
	done
	printf '%-16s %7s\n' gloo "${gloo:-missing}"
} | tee "$out/summary.txt"
