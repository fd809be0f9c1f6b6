#!/usr/bin/env bash
# The between-hosts data paths side by side, in one call (issue 19 item 2):
# bmojo's data-socket path (--transport socket), its gRPC streams (--transport
# grpc), optionally another build's gRPC streams (BASE=<binary>: the code
# before a change), the plain-TCP reference ring (--transport tcp) and
# PyTorch's Gloo, all with the same ranks and size. ROUNDS rounds, each
# running every configuration once, one after the other, so that all of them
# see the same machine load; the order rotates from round to round. Prints
# every run's busbw and CPU per collective (all ranks, user + system), then
# per configuration the median and range over the rounds, and the median of
# the per-round ratios against Gloo and against the TCP ring.
#
#   CGO_ENABLED=0 go build -o bin/bmojo ./cmd/bmojo
#   BASE=/tmp/bmojo-old ROUNDS=5 bench/allreduce_between_hosts.sh [extra bmojo flags]
#
# RANKS (4), SIZE (64MiB), ITERS (8), ROUNDS (3), BMOJO (bin/bmojo), BASE,
# PYTHON (the python3 that has torch; default /usr/bin/python3, Debian's
# python3-torch), OUT (a directory for the raw tables; default a temporary one).
set -uo pipefail
cd "$(dirname "$0")/.."
ranks="${RANKS:-4}"
size="${SIZE:-64MiB}"
iters="${ITERS:-8}"
rounds="${ROUNDS:-3}"
bin="${BMOJO:-bin/bmojo}"
base="${BASE:-}"
py="${PYTHON:-/usr/bin/python3}"
out="${OUT:-$(mktemp -d /tmp/allreduce-between-hosts.XXXXXX)}"
mkdir -p "$out"

configs=(socket grpc)
[ -n "$base" ] && configs+=(base_grpc)
configs+=(tcp gloo)

run() { # run CONFIG ROUND: prints "busbw cpu" of one launch
	local c="$1" f="$out/$1.$2.txt"
	case "$c" in
	socket | grpc | tcp)
		"$bin" bench allreduce --ranks "$ranks" --sizes "$size" --iters "$iters" --log-level error --transport "$c" "${extra[@]}" >"$f" 2>&1 ;;
	base_grpc)
		"$base" bench allreduce --ranks "$ranks" --sizes "$size" --iters "$iters" --log-level error --transport grpc "${extra[@]}" >"$f" 2>&1 ;;
	gloo)
		PYTHONUNBUFFERED=1 "$py" bench/gloo_allreduce.py --ranks "$ranks" --sizes "$size" --iters "$iters" >"$f" 2>&1 ;;
	esac
	awk -v s="$size" '$1 == s {b = $7} /^# cpu\(ms\)/ {c = $NF} END {print (b == "" ? "NaN" : b), (c == "" ? "NaN" : c)}' "$f"
}
extra=("$@")

echo "# $(date -u +%FT%TZ) $(uname -srm); $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg); $ranks ranks, $size float32, $iters iterations per run, $rounds rounds; raw tables in $out"
echo "# bmojo: $bin${base:+; base: $base}; gloo: $("$py" -c 'import torch; print("torch", torch.__version__)' 2>&1)"
printf '%-6s %-10s %10s %10s\n' round config busbw cpu_ms
results="$out/results.txt"
: >"$results"
for r in $(seq 1 "$rounds"); do
	n=${#configs[@]}
	for i in $(seq 0 $((n - 1))); do
		c="${configs[$(((i + r - 1) % n))]}"
		read -r b cpu < <(run "$c" "$r")
		printf '%-6s %-10s %10s %10s\n' "$r" "$c" "$b" "$cpu"
		echo "$r $c $b $cpu" >>"$results"
	done
done

echo "# per configuration over $rounds rounds: busbw GB/s median [min, max]; CPU ms per collective median [min, max];"
echo "# ratios: median over rounds of busbw / the same round's Gloo, and / the same round's TCP ring"
awk -v cfgs="${configs[*]}" '
function median(a, n,   i, j, t) {
	for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
	return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{ b[$2, $1] = $3; c[$2, $1] = $4; if ($1 > R) R = $1 }
END {
	n = split(cfgs, cs, " ")
	printf "%-10s %22s %22s %10s %10s\n", "config", "busbw", "cpu_ms", "x_gloo", "x_tcp"
	for (k = 1; k <= n; k++) {
		x = cs[k]; m = 0; delete bb; delete cc; delete rg; delete rt; ng = 0; nt = 0
		for (r = 1; r <= R; r++) {
			m++; bb[m] = b[x, r]; cc[m] = c[x, r]
			if (b["gloo", r] > 0) rg[++ng] = b[x, r] / b["gloo", r]
			if (b["tcp", r] > 0) rt[++nt] = b[x, r] / b["tcp", r]
		}
		lo = hi = bb[1]; clo = chi = cc[1]
		for (i = 1; i <= m; i++) { if (bb[i] < lo) lo = bb[i]; if (bb[i] > hi) hi = bb[i]; if (cc[i] < clo) clo = cc[i]; if (cc[i] > chi) chi = cc[i] }
		printf "%-10s %6.3f [%6.3f, %6.3f] %6.1f [%6.1f, %6.1f] %9.2fx %9.2fx\n", x, median(bb, m), lo, hi, median(cc, m), clo, chi, median(rg, ng), median(rt, nt)
	}
}' "$results"
