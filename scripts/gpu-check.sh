#!/usr/bin/env bash
# The GPU checks of the CUDA backend in one pass, for a machine with an
# NVIDIA GPU (and PyTorch for the torch.matmul reference). Build here first:
#
#   T=cuda,kustomize_disable_go_plugin_support
#   go build -tags $T -ldflags "-s -w" -o .dev/bmojo ./cmd/bmojo && gzip -9 .dev/bmojo
#   go test -c -ldflags "-s -w" -tags cuda -o .dev/cuda.test ./kernels/cuda
#   go test -c -ldflags "-s -w" -tags cuda -o .dev/model.test ./model
#   go test -c -ldflags "-s -w" -tags $T -o .dev/device.test ./internal/device
#   go build -ldflags "-s -w" -tags $T -o .dev/torchref-dump ./tools/torchref/dump
#   go test -c -ldflags "-s -w" -tags $T -o .dev/worker.test ./worker     # the overlap step
#   # optional, for a before/after: the same bmojo built from an older commit
#   git archive OLD | tar -x -C /tmp/old && (cd /tmp/old && go build -tags $T -ldflags "-s -w" -o /work/main/.dev/bmojo-before ./cmd/bmojo)
#
# (stripped, they fit the 64 MiB a run on the lent GPU machines may carry)
# then run `scripts/gpu-check.sh [OUTDIR]` there. Each step's log goes to
# OUTDIR (packed into OUTDIR/logs.tar.gz at the end, beside the JSON
# results); a summary is printed as it goes, so a run cut short still reports.
# PRESET, SEQ, BATCH, TRAIN_STEPS and TRAIN_LR shrink the runs (e.g. a rehearsal on
# the CPU emulation: binaries built with -tags cuda,cudaemu). CHECKS picks the
# steps (default: all of "conformance devices parity kernels torch step torchstep overlap train torchref");
# STEP_BATCHES adds bench step runs at more batch sizes (e.g. "32").
set -u
cd "$(dirname "$0")/.."
BIN=${BIN:-.dev}
PRESET=${PRESET:-bmojo-130m}
SEQ=${SEQ:-2048}
BATCH=${BATCH:-8}
TRAIN_STEPS=${TRAIN_STEPS:-200}
TRAIN_LR=${TRAIN_LR:-1e-3}
PYTHON=${PYTHON:-python3}
OUT=${1:-${OUT:-/tmp/bmojo-gpu}}
mkdir -p "$OUT"
# Binaries may travel compressed (a call carries at most 64 MiB): bmojo.gz,
# cuda.test.gz, ... or bmojo.xz (a third smaller: two bmojo binaries and the
# tests fit one call that way). Python's lzma stands in where xz is missing.
for gz in "$BIN"/*.gz; do
	[ -f "$gz" ] && [[ $gz != *.jsonl.gz ]] && [ ! -x "${gz%.gz}" ] && gunzip -kf "$gz" && chmod +x "${gz%.gz}" # gunzip keeps the .gz file's mode
done
for x in "$BIN"/*.xz; do
	[ -f "$x" ] && [ ! -x "${x%.xz}" ] || continue
	if command -v xz >/dev/null; then xz -dkc "$x" >"${x%.xz}"; else ${PYTHON:-python3} -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$x" "${x%.xz}"; fi
	chmod +x "${x%.xz}"
done

CHECKS=${CHECKS:-conformance devices parity kernels torch step torchstep overlap train torchref}
STEP_BATCHES=${STEP_BATCHES:-}

step() { # name timeout-seconds command...
	local name=$1 t=$2
	shift 2
	case " $CHECKS " in *" ${name%%-*} "*) ;; *) echo "=== $name: skipped (CHECKS)"; : >"$OUT/$name.log"; return 0 ;; esac
	local t0=$SECONDS
	timeout "$t" "$@" >"$OUT/$name.log" 2>&1
	local rc=$?
	echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
	return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

step conformance 90 "$BIN/cuda.test" -test.v
grep -m1 "GPU 0:" "$OUT/conformance.log"
echo "subtests passed: $(grep -c -- '--- PASS' "$OUT/conformance.log"), failed: $(grep -c -- '--- FAIL' "$OUT/conformance.log")"
grep -- '--- FAIL' "$OUT/conformance.log" | head -20

# NVML's and CUDA's views of the GPUs agree (by UUID), as seen and as
# CUDA_VISIBLE_DEVICES narrows them.
step devices 30 "$BIN/device.test" -test.v -test.run 'GPU'
grep -E -- '--- (PASS|FAIL|SKIP)|device_gpu_test' "$OUT/devices.log" | head -10

step parity 120 "$BIN/model.test" -test.v -test.run 'TestCUDAParity|TestCUDALabelledHead'
grep -E -- '--- (PASS|FAIL)|parity_cuda_test' "$OUT/parity.log" | head -40

step kernels 60 "$BIN/bmojo" bench kernels --preset "$PRESET" --seq-len "$SEQ" --batch-size "$BATCH" --json "$OUT/kernels.json"
grep -v '^20..-' "$OUT/kernels.log" | head -60
# torch.matmul on the same shapes, and its 8192³ bf16 rate: the H200's
# measured matrix peak, the reference for MFU below.
step torch 60 "$PYTHON" bench/torch_matmul.py "$OUT/kernels.json" --peak
tail -20 "$OUT/torch.log"
# The same with cuBLASLt's first-guess algorithm per shape (--no-gemm-tune),
# against the same torch reference: what timing the candidates gains.
step kernels-firstguess 60 "$BIN/bmojo" bench kernels --no-gemm-tune --preset "$PRESET" --seq-len "$SEQ" --batch-size "$BATCH" --json "$OUT/kernels-firstguess.json"
[ -f "$OUT/kernels-firstguess.json" ] && step torch-firstguess 60 "$PYTHON" bench/torch_matmul.py "$OUT/kernels-firstguess.json" &&
	grep -E '^worst' "$OUT/torch-firstguess.log"
PEAK=$(sed -n 's/^PEAK_TFLOPS=//p' "$OUT/torch.log")
peakflag=()
[ -n "$PEAK" ] && peakflag=(--peak-tflops "$PEAK")

# The same step from the binary of an older commit, in the same call: the
# before of a before/after (the timelines side by side).
if [ -x "$BIN/bmojo-before" ]; then
	step step-before 90 "$BIN/bmojo-before" bench step --device cuda --preset "$PRESET" --seq-len "$SEQ" --batch-size "$BATCH" --steps 5 --timeline "${peakflag[@]}" --json "$OUT/step-before.json"
	grep -v '^\s*$' "$OUT/step-before.log" | grep -v '^20..-' | head -40
fi
step step 90 "$BIN/bmojo" bench step --device cuda --preset "$PRESET" --seq-len "$SEQ" --batch-size "$BATCH" --steps 5 --timeline "${peakflag[@]}" --json "$OUT/step.json"
grep -v '^\s*$' "$OUT/step.log" | grep -v '^20..-' | head -40
# The same model in the best PyTorch a user could write (torch.compile,
# FlexAttention, a chunked scan), timed right after bench step on the same
# GPU: the ratio issue 18 sets a floor for. Compiling takes minutes.
step torchstep 420 "$PYTHON" bench/torch_step.py --preset "$PRESET" --seq-len "$SEQ" --batch-size "$BATCH" --steps 10 --warmup 3 \
	--bmojo-json "$OUT/step.json" --json "$OUT/torch-step.json"
tail -8 "$OUT/torchstep.log"
for b in $STEP_BATCHES; do
	step "step-b$b" 150 "$BIN/bmojo" bench step --device cuda --preset "$PRESET" --seq-len "$SEQ" --batch-size "$b" --steps 3 --max-batch=false --timeline "${peakflag[@]}" --json "$OUT/step-b$b.json"
	grep -v '^\s*$' "$OUT/step-b$b.log" | grep -v '^20..-' | head -12
done

# Two replicas on this one GPU, joined by a real ring: the worker's gradient
# reduction with synchronous copies and with async ones overlapping
# backward (the hidden fraction), after the async copies' and the
# reducer's own GPU tests (the worker's default path since they passed on an H200;
# --overlap-copies=false is the synchronous reference).
if [ -x "$BIN/worker.test" ]; then
	step overlap-tests 120 "$BIN/worker.test" -test.v -test.run 'CUDA'
	grep -E -- '--- (PASS|FAIL)' "$OUT/overlap-tests.log" | head -20
fi
step overlap 240 "$BIN/bmojo" bench step --device cuda --preset "$PRESET" --seq-len "$SEQ" --batch-size "$BATCH" --steps 10 --workers 2 --json "$OUT/overlap.json"
grep -v '^\s*$' "$OUT/overlap.log" | grep -v '^20..-' | head -20

# The 130m model trains on the bundled corpus (bytes); halfway through, the
# dashboard's /metrics must carry the worker's NVML telemetry.
case " $CHECKS " in *" train "*)
	( sleep 30; "$PYTHON" -c 'import urllib.request as u; print(u.urlopen("http://127.0.0.1:8080/metrics").read().decode())' | grep -E '^bmojo_worker_(gpu|tokens)' >"$OUT/nvml.txt" ) & ;;
esac
step train 180 "$BIN/bmojo" train --device cuda --workers 1 --preset "$PRESET" --steps "$TRAIN_STEPS" --batch-size "$BATCH" \
	--lr "$TRAIN_LR" --eval-every "$((TRAIN_STEPS / 4))" --eval-batches 8 --checkpoint-every "$TRAIN_STEPS" --checkpoint-dir "$OUT/run"
tr '\r' '\n' <"$OUT/train.log" | grep -E 'eval|skipped|loss|throughput|unigram' | grep -v 'tok/s ' | tail -14
wait
[ -f "$OUT/nvml.txt" ] && { echo "NVML telemetry in /metrics during training:"; cat "$OUT/nvml.txt"; }
rm -rf "$OUT/run"

if [ -x "$BIN/torchref-dump" ]; then
	# The GPU model against the PyTorch reference of docs/model.md (docs/model.md §5 tolerances).
	PYTHON="$PYTHON" GO_DEVICE=cuda SIZES=tiny DUMP_BIN="$BIN/torchref-dump" step torchref 120 tools/torchref/run.sh "$OUT/torchref"
	tail -12 "$OUT/torchref.log"
fi

# Everything but the JSON results in one archive (the device tool returns
# at most 8 files).
tar -czf "$OUT/logs.tar.gz" -C "$OUT" --warning=no-file-changed --exclude='*.json' --exclude=logs.tar.gz .
find "$OUT" -mindepth 1 ! -name '*.json' ! -name logs.tar.gz -delete
