#!/bin/sh
# Regenerates the bundled corpus files embedded by package data.
#
# Run from anywhere on Debian with Go installed:
#   apt-get install bible-kjv        # pulls in bible-kjv-text (the KJV data)
#   sh data/corpus/build.sh
#
# Output is byte-for-byte reproducible: gzip -n drops the name and timestamp
# so rebuilding does not produce a spurious diff.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. Isaac Newton, "Opticks" (4th ed., 1730), Project Gutenberg e-text as
#    shipped in the Go distribution's testdata. The Gutenberg header and
#    licence are already stripped there; we also drop the 3-line volunteer
#    credit so that only Newton's text remains.
opticks="$(go env GOROOT)/src/testdata/Isaac.Newton-Opticks.txt"
sed '1,3d' "$opticks" > "$tmp/opticks.txt"

# 2. King James Bible (1611 text), every verse from Genesis 1:1 to
#    Revelation 22:21 via the bible-kjv CLI. A huge line width stops the
#    CLI from wrapping verses, so each verse is one line, after a
#    "Book N" chapter heading.
COLUMNS=100000 bible -l100000 gen1:1-rev22:21 > "$tmp/kjv.txt"
verses=$(grep -c '^ \{1,\}[0-9]' "$tmp/kjv.txt")
if [ "$verses" -ne 31102 ]; then
	echo "build.sh: expected 31102 KJV verses, got $verses" >&2
	exit 1
fi

for f in opticks kjv; do
	gzip -9 -n -c "$tmp/$f.txt" > "$here/$f.txt.gz"
	printf '%-8s raw %8d bytes  gzip %8d bytes\n' "$f" \
		"$(wc -c < "$tmp/$f.txt")" "$(wc -c < "$here/$f.txt.gz")"
done
