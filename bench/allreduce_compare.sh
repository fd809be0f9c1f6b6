#!/usr/bin/env bash
# Runs bmojo's ring all-reduce and PyTorch's Gloo all-reduce with the same
# ranks and sizes on this machine, one after the other, and writes both
# tables (and the machine's description) to $OUT (default ./out).
#
#   CGO_ENABLED=0 go build -o bin/bmojo ./cmd/bmojo     # on the dev machine
#   bench/allreduce_compare.sh 4 1GiB                    # on the GPU machine
#
# Extra arguments after the first two go to bmojo (e.g. --streams 8).
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
	python3 -c 'import torch; print("# torch", torch.__version__)' 2>&1
} | tee "$out/machine.txt"

echo "== bmojo fp32"
"$bin" bench allreduce --ranks "$ranks" --size "$size" --log-level error "$@" 2>&1 | tee "$out/bmojo_f32.txt"
echo "== bmojo bf16 wire"
"$bin" bench allreduce --ranks "$ranks" --size "$size" --bf16 --log-level error "$@" 2>&1 | tee "$out/bmojo_bf16.txt"
echo "== gloo"
PYTHONUNBUFFERED=1 python3 bench/gloo_allreduce.py --ranks "$ranks" --size "$size" 2>&1 | tee "$out/gloo.txt"
