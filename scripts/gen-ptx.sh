#!/usr/bin/env bash
# Compiles the CUDA kernels (kernels/cuda/csrc/*.cu) to the PTX that the
# cuda backend embeds (kernels/cuda/ptx/). PTX ISA 7.8 for compute_90 from
# nvcc 11.8 (Debian's nvidia-cuda-toolkit); the driver JIT-compiles it.
# With --check, fails if the committed PTX differs from a fresh build.
set -euo pipefail
cd "$(dirname "$0")/.."
src=kernels/cuda/csrc
dst=kernels/cuda/ptx
out=$dst
if [ "${1:-}" = "--check" ]; then
	out="$(mktemp -d)"
	trap 'rm -rf "$out"' EXIT
fi
command -v nvcc >/dev/null || { echo "gen-ptx: nvcc not found (apt-get install nvidia-cuda-toolkit from Debian non-free)" >&2; exit 1; }
mkdir -p "$out"
for cu in "$src"/*.cu; do
	name="$(basename "$cu" .cu)"
	nvcc -arch=compute_90 -ptx -O3 -std=c++17 -I"$src" "$cu" -o "$out/$name.ptx"
done
if [ "${1:-}" = "--check" ]; then
	if ! diff -r "$dst" "$out" >/dev/null; then
		diff -r "$dst" "$out" | head -20
		echo "gen-ptx: committed PTX differs from kernels/cuda/csrc (run make ptx and commit)" >&2
		exit 1
	fi
	echo "gen-ptx: PTX matches the sources"
fi
