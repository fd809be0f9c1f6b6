# Developer shortcuts; CI runs .ci/run.
.PHONY: ptx ptx-check build build-cuda test fuzz experiments-quick chaos

ptx: ## regenerate kernels/cuda/ptx from kernels/cuda/csrc (needs nvcc)
	scripts/gen-ptx.sh

ptx-check: ## fail if the committed PTX is stale
	scripts/gen-ptx.sh --check

build:
	go build -o bin/bmojo ./cmd/bmojo

build-cuda: ptx ## the GPU binary: CGO, links only libcuda.so.1
	CGO_ENABLED=1 go build -tags cuda,kustomize_disable_go_plugin_support -ldflags "-s -w" -o bin/bmojo-cuda ./cmd/bmojo

test:
	go test ./...

# The long chaos run (tests/chaos): 1000 steps, 20 worker, 3 coordinator and
# 1 etcd SIGKILLs; go test ./... runs the short one. BMOJO_CHAOS_SEED=N
# replays a schedule.
chaos: ## the long chaos run (about 5 minutes on 2 cores)
	BMOJO_CHAOS=long go test -count=1 -v -timeout 40m -run '^TestChaos$$' ./tests/chaos/

# Every fuzz target for FUZZTIME each (CI runs them for 10 s).
FUZZTIME ?= 1m
FUZZ_TARGETS = FuzzParse:./job FuzzDecodeRecords:./job FuzzParseConfig:./model FuzzLaunchFile:./internal/launch \
	FuzzParseShard:./data FuzzDecodeFrame:./allreduce FuzzParse:./internal/safetensors
fuzz: ## run every fuzz target for FUZZTIME (default 1m)
	@for t in $(FUZZ_TARGETS); do \
		FUZZTIME=$(FUZZTIME) scripts/fuzz.sh "$${t%%:*}" "$${t#*:}" || exit 1; \
	done

experiments-quick: ## the three experiments' --quick mode on the CPU, as a test (minutes)
	BMOJO_LONG=1 go test -count=1 -run '^TestExperimentQuick$$' -timeout 30m ./cmd/bmojo
