#!/usr/bin/env bash
# Builds kube-apiserver v1.37.2 from the Go module proxy (tools/kube-apiserver),
# and beside it the single-member etcd it stores into (tools/kube-apiserver/etcd,
# the etcd version Kubernetes pins), into a cache directory, only when they are
# missing: the build takes about ten minutes on two cores, so CI and
# developers reuse the cached binaries.
# Prints kube-apiserver's path on stdout; the launch API-server test reads it
# from BMOJO_KUBE_APISERVER and finds etcd in the same directory, e.g.
#   export BMOJO_KUBE_APISERVER="$(scripts/kube-apiserver.sh)"
set -euo pipefail
cd "$(dirname "$0")/.."

version=v1.37.2
dir="${BMOJO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bmojo}/kube-apiserver-$version"
bin="$dir/kube-apiserver"
etcd="$dir/etcd"

if [ -x "$bin" ] && [ -x "$etcd" ] && "$bin" --version >/dev/null 2>&1; then
	echo "$bin"
	exit 0
fi

mkdir -p "$dir"
echo "building kube-apiserver $version into $dir (about 10 minutes on 2 cores)" >&2
# Build to a temporary name and rename, so an interrupted build never leaves a
# half-written binary that the check above would take for a cached one.
(cd tools/kube-apiserver && CGO_ENABLED=0 go build -trimpath -ldflags "-X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37" -o "$bin.tmp" . && CGO_ENABLED=0 go build -trimpath -o "$etcd.tmp" ./etcd)
mv "$bin.tmp" "$bin"
mv "$etcd.tmp" "$etcd"
"$bin" --version >&2
echo "$bin"
