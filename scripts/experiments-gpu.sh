#!/usr/bin/env bash
# Runs the sweeps of issue 17 (`bmojo experiment mqar|length|memory`) on the
# lent GPU machine (one H100/H200, 16 cores, no network, 10 minutes per
# command, about 25 minutes of device time per session, at most 8 files of
# 16 MiB back from $OUT), resumably across calls.
#
# Here, once per code change (the binary travels in .dev, which git ignores),
# with the RFC bundle the length and memory sweeps train on (made by
# scripts/corpus-rfc.sh; 13 MiB, prepared on the GPU machine in seconds):
#
#   T=cuda,kustomize_disable_go_plugin_support
#   go build -tags $T -ldflags "-s -w" -o .dev/bmojo ./cmd/bmojo && gzip -9f .dev/bmojo
#   cp runs/gpu-rfc/rfc-bundle.jsonl.gz .dev/
#   # for CHECK=1 (the first call after a change to model/ or kernels/):
#   go test -c -ldflags "-s -w" -tags cuda -o .dev/cuda.test ./kernels/cuda
#   go test -c -ldflags "-s -w" -tags cuda -o .dev/model.test ./model
#
# (.dev must hold nothing else: a call carries at most 64 MiB.)
#
# Then, as many times as it takes (each call runs the cells that its
# estimate says fit CALL_BUDGET, then packs what it has):
#
#   device run: command "scripts/experiments-gpu.sh", carry [".dev"], timeout_s 600
#   here:       scripts/experiments-gpu.sh unpack <files_at>
#
# `unpack` copies the finished cells into docs/results/gpu-cells/ (results
# only, a few KB each: they travel with the working tree, so the next call
# skips them) and the CSVs and plots into docs/results/. A cell killed
# mid-run leaves no result and is rerun from scratch by the next call.
#
# Knobs (environment): EXPERIMENTS (default "mqar length memory"; order is
# priority), CALL_BUDGET (seconds of estimated device time this call may
# spend, default 420: the estimate can be off, and packing must happen
# before the 600 s limit), JOBS (cells sharing the GPU at once, each in its
# own process, default 6), EXTRA_<EXP> (more flags for one experiment, e.g.
# EXTRA_MQAR="--d-model 64,128"), DRY_RUN=1 (print the measured plans only),
# DEVICE (default cuda; cpu with EXTRA_<EXP>=--quick rehearses the script here),
# RFC (default .dev/rfc-bundle.jsonl.gz: when it exists, it is prepared with
# the GPT-2 tokenizer and the length and memory sweeps train on it; RFC=""
# keeps the bundled corpus), MPS (default 1: see below), CHECK (default 0; 1
# runs the GPU conformance and parity checks first: see below).
set -u
cd "$(dirname "$0")/.."
CELLS=docs/results/gpu-cells

if [ "${1:-}" = unpack ]; then
	from=${2:?usage: scripts/experiments-gpu.sh unpack FILES_AT}
	tmp=$(mktemp -d)
	tar xzf "$from/experiments.tar.gz" -C "$tmp" || exit 1
	mkdir -p "$CELLS"
	# Results only: checkpoints stay on the GPU machine (too big to carry).
	(cd "$tmp/cells" && find . -name result.json -o -name cell.json | while read -r f; do
		mkdir -p "$OLDPWD/$CELLS/$(dirname "$f")" && cp "$f" "$OLDPWD/$CELLS/$f"; done)
	for f in "$tmp"/results/*.csv "$tmp"/results/*.png; do [ -e "$f" ] && cp "$f" docs/results/; done
	cp "$tmp/log.txt" docs/results/gpu-last-log.txt 2>/dev/null
	echo "cells cached here: $(find "$CELLS" -name result.json | wc -l); results in docs/results/"
	rm -rf "$tmp"
	exit 0
fi

BIN=${BIN:-.dev/bmojo}
[ -f "$BIN.gz" ] && [ ! -x "$BIN" ] && gunzip -kf "$BIN.gz" && chmod +x "$BIN"
if [ -f "$BIN.xz" ] && [ ! -x "$BIN" ]; then # xz where present, else Python's lzma
	if command -v xz >/dev/null; then xz -dkc "$BIN.xz" >"$BIN"; else python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$BIN.xz" "$BIN"; fi
	chmod +x "$BIN"
fi
OUTDIR=${OUT:-/tmp/bmojo-experiments-out}
WORK=/tmp/bmojo-experiments
EXPERIMENTS=${EXPERIMENTS:-mqar length memory}
CALL_BUDGET=${CALL_BUDGET:-420}
JOBS=${JOBS:-6}
DEVICE=${DEVICE:-cuda} # cpu for a rehearsal here (with EXTRA_<EXP>=--quick)
mkdir -p "$OUTDIR" "$WORK/cells" "$WORK/results"
[ -d "$CELLS" ] && cp -r "$CELLS/." "$WORK/cells/"
LOG=$WORK/log.txt
: >"$LOG"

pack() {
	tar czf "$OUTDIR/experiments.tar.gz" -C "$WORK" cells results log.txt
}

# CUDA MPS lets the JOBS processes' kernels run on the GPU at the same
# time (without it the GPU time-slices between their contexts, and small
# models leave it mostly idle). It is a user-space daemon: nothing about
# the GPU's own settings changes. MPS=0 turns it off.
if [ "${MPS:-1}" = 1 ] && [ "$DEVICE" = cuda ] && [ "$JOBS" -gt 1 ] && command -v nvidia-cuda-mps-control >/dev/null; then
	export CUDA_MPS_PIPE_DIRECTORY=$WORK/mps CUDA_MPS_LOG_DIRECTORY=$WORK/mps-log
	mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
	if nvidia-cuda-mps-control -d; then
		echo "CUDA MPS on for $JOBS processes" | tee -a "$LOG"
		trap 'echo quit | nvidia-cuda-mps-control' EXIT
	fi
fi

{
	date -u
	nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
	echo "cells already cached: $(find "$WORK/cells" -name result.json | wc -l)"
} 2>&1 | tee -a "$LOG"

# CHECK=1 first runs the CUDA backend's conformance suite and the model's
# GPU parity (scripts/gpu-check.sh, about 1 minute; carry .dev/cuda.test and
# .dev/model.test too), so results never come from a backend that fails them;
# its summary goes into the log.
if [ "${CHECK:-0}" = 1 ]; then
	BIN=$(dirname "$BIN") CHECKS="conformance parity" timeout 300 scripts/gpu-check.sh "$WORK/gpu-check" 2>&1 | tail -30 | tee -a "$LOG"
fi

RFC=${RFC-.dev/rfc-bundle.jsonl.gz}
if [ -n "$RFC" ] && [ -f "$RFC" ]; then
	[ -f "$WORK/rfc/dataset.json" ] || timeout 120 "$BIN" data prepare --tokenizer gpt2 --out "$WORK/rfc" "$RFC" 2>&1 | tail -1 | tee -a "$LOG"
	export EXTRA_LENGTH="--data $WORK/rfc ${EXTRA_LENGTH:-}" EXTRA_MEMORY="--data $WORK/rfc ${EXTRA_MEMORY:-}"
fi

start=$SECONDS
for e in $EXPERIMENTS; do
	left=$((CALL_BUDGET - (SECONDS - start)))
	if [ "$left" -lt 30 ]; then
		echo "=== $e: skipped, ${left}s of this call's budget left (the next call resumes)" | tee -a "$LOG"
		continue
	fi
	var=EXTRA_$(echo "$e" | tr a-z A-Z)
	flags=(--device "$DEVICE" --jobs "$JOBS" --cache "$WORK/cells" --checkpoints "$WORK/ckpt" --out "$WORK/results"
		--budget "${left}s" --fit)
	[ "${DRY_RUN:-0}" = 1 ] && flags+=(--dry-run)
	echo "=== $e: ${left}s of estimated device time left in this call" | tee -a "$LOG"
	t0=$SECONDS
	# The hard stop leaves time to pack: a cell cut off is simply not cached.
	# shellcheck disable=SC2086
	timeout --signal=TERM --kill-after=20 $((left + 60)) "$BIN" experiment "$e" "${flags[@]}" ${!var:-} 2>&1 | tee -a "$LOG"
	echo "=== $e: rc=${PIPESTATUS[0]} in $((SECONDS - t0)) s" | tee -a "$LOG"
	pack
done
echo "cells cached after this call: $(find "$WORK/cells" -name result.json | wc -l)" | tee -a "$LOG"
pack
