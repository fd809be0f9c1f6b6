#!/usr/bin/env bash
# Golden-state check of the Go model against the PyTorch reference of
# docs/model.md (tools/torchref/README.md): for every family at the tiny and small
# sizes (plus option cases), the Go dump writes a golden file and
# bmojo_ref.py recomputes and compares it.
#
#   tools/torchref/run.sh [LOGDIR]        (default /tmp/torchref)
#
# Environment:
#   DUMP_BIN   prebuilt dump binary (go build -o bin/torchref-dump ./tools/torchref/dump);
#              without it the dump is built from source with the go tool
#   PYTHON     interpreter with torch (default python3)
#   GO_DEVICE  -device of the dump (default cpu)
#   DEVICE     torch device of the reference (default cpu)
#   DTYPE      reference dtype (default float64)
#   STRICT     1 = tight tolerances (default when GO_DEVICE=cpu), 0 = docs/model.md §5 only
#   SIZES      sizes to run (default "tiny small"); "extra" cases run with tiny
#   STEPS      optimizer steps per case (default 10)
#   ONLY       run only cases whose name contains this string
# Exit status: 0 when every case passes, 1 otherwise.
set -u -o pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
log=${1:-/tmp/torchref}
mkdir -p "$log" || exit 1
log=$(cd "$log" && pwd)

python=${PYTHON:-python3}
go_device=${GO_DEVICE:-cpu}
device=${DEVICE:-cpu}
dtype=${DTYPE:-float64}
sizes=${SIZES:-tiny small}
steps=${STEPS:-10}
only=${ONLY:-}
if [ -z "${STRICT:-}" ]; then
	if [ "$go_device" = cpu ] && [ "$dtype" = float64 ]; then STRICT=1; else STRICT=0; fi
fi
strict=()
[ "$STRICT" = 1 ] && strict=(--strict)

if ! "$python" -c 'import torch' 2>/dev/null; then
	echo "run.sh: $python cannot import torch; set PYTHON to an interpreter with PyTorch" >&2
	exit 1
fi

if [ -n "${DUMP_BIN:-}" ]; then
	dump=$DUMP_BIN
	if [ ! -x "$dump" ]; then
		echo "run.sh: DUMP_BIN=$dump is not an executable file" >&2
		exit 1
	fi
elif command -v go >/dev/null 2>&1; then
	# go run, built once instead of once per case.
	dump=$log/torchref-dump
	echo "building the dump: go build -o $dump ./tools/torchref/dump"
	(cd "$root" && go build -o "$dump" ./tools/torchref/dump) || exit 1
else
	echo "run.sh: no go tool and no DUMP_BIN; build it elsewhere with" >&2
	echo "  go build -o bin/torchref-dump ./tools/torchref/dump   and set DUMP_BIN=bin/torchref-dump" >&2
	exit 1
fi

# name | dump arguments
cases=()
for size in $sizes; do
	case $size in
	tiny)
		for f in bmojo bmojo-f mamba swa transformer hybrid; do
			cases+=("$f-tiny|-preset $f-tiny -batch 2")
		done
		# Options the presets leave alone: FIFO eviction (chunk 16 so the delay
		# is 5 chunks and up to 22 selections are visible, memory 5) with
		# unrotated memory scores; grouped-query attention (4 heads over 2 kv
		# heads) with a fading window shorter than the context window.
		cases+=("bmojo-tiny-evict-norope|-preset bmojo-tiny -batch 2 -seq-len 256 -set chunk=16 -set memory=5 -set memory_rope=none")
		cases+=("bmojo-tiny-gqa-wf16|-preset bmojo-tiny -batch 2 -set n_head=4 -set head_dim=16 -set n_kv_head=2 -set fading_window=16")
		;;
	small)
		# T = 512 so that the memory (visible from chunk 3 on, C = 128) is used.
		cases+=("bmojo-small|-preset bmojo-small -batch 1 -seq-len 512")
		for f in bmojo-f mamba swa transformer hybrid; do
			cases+=("$f-small|-preset $f-small -batch 1 -seq-len 256")
		done
		;;
	*)
		echo "run.sh: unknown size $size in SIZES (tiny, small)" >&2
		exit 1
		;;
	esac
done

summary=$log/summary.txt
: >"$summary"
fails=0
t_all=$SECONDS
for c in "${cases[@]}"; do
	name=${c%%|*}
	args=${c#*|}
	if [ -n "$only" ] && [[ $name != *"$only"* ]]; then continue; fi
	golden=$log/$name.safetensors
	rm -f "$log/$name.check.log"
	t0=$SECONDS
	# shellcheck disable=SC2086 # args are word lists by construction
	if ! "$dump" $args -steps "$steps" -seed 1 -device "$go_device" -out "$golden" >"$log/$name.dump.log" 2>&1; then
		line="FAIL  $name  (dump failed: $(tail -1 "$log/$name.dump.log"))"
		fails=$((fails + 1))
	else
		t1=$SECONDS
		"$python" "$here/bmojo_ref.py" "$golden" --device "$device" --dtype "$dtype" "${strict[@]}" >"$log/$name.check.log" 2>&1
		rc=$?
		res=$(tail -1 "$log/$name.check.log")
		if [ $rc -eq 0 ]; then
			line="pass  $name  (dump $((t1 - t0)) s, check $((SECONDS - t1)) s)"
		else
			line="FAIL  $name  (exit $rc: $res; see $log/$name.check.log)"
			fails=$((fails + 1))
		fi
	fi
	echo "$line" | tee -a "$summary"
	if [ -f "$log/$name.check.log" ]; then
		grep -E '  FAIL  ' "$log/$name.check.log" | head -5 | sed 's/^/      /' | tee -a "$summary"
	fi
done
echo "torchref: $fails failing case(s), $((SECONDS - t_all)) s; logs in $log" | tee -a "$summary"
[ $fails -eq 0 ]
