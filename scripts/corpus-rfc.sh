#!/usr/bin/env bash
# The IETF RFCs as a training corpus that can be had offline: Debian's
# non-free doc-rfc-* packages (about 9,150 RFCs, 496 MB of English technical
# prose as .txt and .txt.gz), made into
#
#   OUT/rfc.jsonl             every RFC, one JSON line each ({"rfc", "category",
#                             "text"}), in RFC-number order;
#   OUT/rfc-gpt2/             a GPT-2 dataset of it (bmojo data prepare
#                             --tokenizer gpt2), validation held out by
#                             document (one RFC in 20);
#   OUT/rfc-bundle.jsonl.gz   the newest RFCs that fit in BUNDLE_MIB (default
#                             58) MiB of gzip, for a GPU machine, which reaches
#                             no package registry and takes at most 64 MiB of
#                             files a run. There:
#                               bmojo data prepare --tokenizer gpt2 --out rfc-gpt2 rfc-bundle.jsonl.gz
#
# Usage: scripts/corpus-rfc.sh [OUT]   (default runs/corpus-rfc; needs root
# for apt unless the packages are installed). BMOJO names a bmojo binary
# (default: built into OUT). CHECK=1 also prepares with --workers 1 and
# compares the shards with the all-core run byte for byte. The prepare runs
# under /usr/bin/time -v when it is installed, and its maximum RSS is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/corpus-rfc}}
BUNDLE_MIB=${BUNDLE_MIB:-58}
RFC_DIR=/usr/share/doc/RFC
PACKAGES=(doc-rfc-std doc-rfc-std-proposed doc-rfc-informational doc-rfc-experimental
	doc-rfc-fyi-bcp doc-rfc-misc doc-rfc-old-std doc-rfc-others)
mkdir -p "$OUT"

# 1. The packages, from Debian's non-free component (enabled as .ci/run does
# for nvidia-cuda-toolkit).
missing=()
for p in "${PACKAGES[@]}"; do
	dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
command -v python3 >/dev/null 2>&1 || missing+=(python3-minimal)
if [ "${#missing[@]}" -gt 0 ]; then
	echo "corpus-rfc: installing ${missing[*]}" >&2
	for src in /etc/apt/sources.list.d/debian.sources; do
		[ -f "$src" ] && sed -i 's/^Components: main$/Components: main contrib non-free/' "$src"
	done
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. bmojo.
BMOJO=${BMOJO:-}
if [ -z "$BMOJO" ]; then
	BMOJO=$OUT/bmojo
	go build -o "$BMOJO" ./cmd/bmojo
fi

# 3. The JSONL corpus and the bundle. links/ holds symlinks to the same
# files, so it is left out; each RFC is in one category directory (old/
# holds the obsoleted ones, by category).
python3 - "$RFC_DIR" "$OUT/rfc.jsonl" "$OUT/rfc-bundle.jsonl.gz" "$BUNDLE_MIB" <<'EOF'
import gzip, json, os, re, sys
rfc_dir, jsonl, bundle, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) << 20
docs = []
for root, dirs, files in os.walk(rfc_dir):
    dirs[:] = sorted(d for d in dirs if not (root == rfc_dir and d == "links"))
    cat = os.path.relpath(root, rfc_dir)
    for name in files:
        m = re.fullmatch(r"rfc(\d+)\.txt(\.gz)?", name)
        if m:
            docs.append((int(m.group(1)), cat, os.path.join(root, name)))
docs.sort()
if not docs:
    sys.exit("corpus-rfc: no rfc*.txt[.gz] under " + rfc_dir)
spans, text_bytes = [], 0  # (offset, length, text bytes) of each line
with open(jsonl, "wb") as out:
    for num, cat, path in docs:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            # A few old RFCs are not UTF-8; their odd bytes become U+FFFD.
            text = f.read().decode("utf-8", errors="replace")
        line = (json.dumps({"rfc": num, "category": cat, "text": text}, ensure_ascii=False) + "\n").encode("utf-8")
        spans.append((out.tell(), len(line), len(text.encode("utf-8"))))
        out.write(line)
        text_bytes += spans[-1][2]
# The bundle: newest RFCs first until the compressed size reaches the
# budget (less 1 MiB for what gzip still buffers).
n = bundle_text = 0
with open(jsonl, "rb") as src, open(bundle, "wb") as raw:
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as z:
        for off, length, tb in reversed(spans):
            if raw.tell() > budget - (1 << 20):
                break
            src.seek(off)
            z.write(src.read(length))
            n += 1
            bundle_text += tb
print(f"corpus-rfc: {len(docs)} RFCs, {text_bytes/1e6:.1f} MB of text -> {jsonl}", file=sys.stderr)
print(f"corpus-rfc: bundle {bundle}: the newest {n} RFCs, {bundle_text/1e6:.1f} MB of text, "
      f"{os.path.getsize(bundle)/2**20:.1f} MiB gzip", file=sys.stderr)
EOF

# 4. The GPT-2 dataset: a .jsonl input is split by document.
prepare() { # OUTDIR [FLAGS...]
	local dir=$1
	shift
	if [ -x /usr/bin/time ]; then
		/usr/bin/time -v "$BMOJO" data prepare --tokenizer gpt2 --out "$dir" "$@" "$OUT/rfc.jsonl" 2>"$dir.log" || {
			cat "$dir.log" >&2
			return 1
		}
		grep -E 'prepared dataset|Maximum resident|Elapsed \(wall' "$dir.log" >&2
	else
		"$BMOJO" data prepare --tokenizer gpt2 --out "$dir" "$@" "$OUT/rfc.jsonl"
	fi
}
prepare "$OUT/rfc-gpt2"
"$BMOJO" data inspect "$OUT/rfc-gpt2" | grep -E '^(dataset|documents|train:|val:)'

# 5. Optional: one worker gives the same bytes as every core.
if [ "${CHECK:-0}" = 1 ]; then
	prepare "$OUT/rfc-gpt2-w1" --workers 1
	if diff -r "$OUT/rfc-gpt2" "$OUT/rfc-gpt2-w1" >/dev/null; then
		echo "corpus-rfc: --workers 1 and every core wrote byte-identical shards and manifests" >&2
		rm -rf "$OUT/rfc-gpt2-w1"
	else
		echo "corpus-rfc: --workers 1 output DIFFERS from the all-core run ($OUT/rfc-gpt2-w1)" >&2
		exit 1
	fi
fi
echo "corpus-rfc: on the GPU machine: bmojo data prepare --tokenizer gpt2 --out rfc-gpt2 rfc-bundle.jsonl.gz" >&2
