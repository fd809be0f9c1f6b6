#!/usr/bin/env bash
# Runs one Go fuzz target for FUZZTIME: scripts/fuzz.sh TARGET PACKAGE.
# `make fuzz` calls it for every target.
#
# Go 1.26's fuzzing coordinator can fail a target with a bare "context
# deadline exceeded" when -fuzztime runs out while a worker is mid-input
# (golang/go#75804, fixed in Go 1.27): no input failed, and no reproducer
# is written. Such a run is retried once. Anything else fails at once,
# above all a run that wrote a failing input to testdata/fuzz.
set -uo pipefail
target=${1:?usage: scripts/fuzz.sh TARGET PACKAGE}
pkg=${2:?usage: scripts/fuzz.sh TARGET PACKAGE}
fuzztime=${FUZZTIME:-1m}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for attempt in 1 2; do
	[ "$attempt" = 1 ] && echo "== $target in $pkg"
	go test -run '^$' -fuzz "^$target\$" -fuzztime "$fuzztime" "$pkg" 2>&1 | tee "$log"
	[ "${PIPESTATUS[0]}" = 0 ] && exit 0
	if [ "$attempt" = 1 ] && grep -q '^    context deadline exceeded$' "$log" &&
		! grep -qE 'Failing input written|panic:|_test\.go:[0-9]+:' "$log"; then
		echo "== $target: the fuzzing coordinator's deadline race (golang/go#75804), no failing input: once more"
		continue
	fi
	exit 1
done
exit 1
