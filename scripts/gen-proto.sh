#!/usr/bin/env bash
# Regenerates the Go code for proto/*.proto into proto/ (or into $1 when given,
# which scripts/check-proto.sh uses to detect drift).
# protoc comes from Debian's protobuf-compiler package; the Go plugins are
# installed at pinned versions so every machine generates identical code.
set -euo pipefail
cd "$(dirname "$0")/.."

PROTOC_GEN_GO_VERSION=v1.36.12      # matches google.golang.org/protobuf in go.mod
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2

out="${1:-proto}"

if ! command -v protoc >/dev/null 2>&1; then
	echo "gen-proto: protoc not found; install it: apt-get install -y protobuf-compiler" >&2
	exit 1
fi

bin="$(go env GOPATH)/bin"
export PATH="$bin:$PATH"
GOFLAGS=-mod=mod go install "google.golang.org/protobuf/cmd/protoc-gen-go@${PROTOC_GEN_GO_VERSION}"
GOFLAGS=-mod=mod go install "google.golang.org/grpc/cmd/protoc-gen-go-grpc@${PROTOC_GEN_GO_GRPC_VERSION}"

mkdir -p "$out"
protoc -I proto \
	--go_out="$out" --go_opt=module=github.com/bmojo/bmojo/proto \
	--go-grpc_out="$out" --go-grpc_opt=module=github.com/bmojo/bmojo/proto \
	proto/*.proto
