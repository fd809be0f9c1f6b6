// Package cuda is the GPU backend of kernels.Backend[float32], on NVIDIA GPUs
// through the CUDA driver API (gorgonia.org/cu). It is compiled only with the
// build tag "cuda"; without it Open returns ErrNotBuilt and callers use the
// CPU backend.
//
// # Runtime
//
// A Device owns one CUDA context (the device's primary context, which
// cuBLAS shares) bound to one OS thread: every driver call runs on that
// locked goroutine, handed over through Device.do. Work goes to one
// non-blocking stream, so kernels of one step run in issue order with no
// host round trip; Download, SumSquares and Err are the only points that
// wait for the GPU. The async copies of kernels.AsyncCopier (async.go) run
// on a second stream through page-locked staging memory, and a second
// locked thread (the waiter) waits for their ends, so neither the caller
// nor the device thread does. Device memory comes from a caching allocator (blocks are
// recycled by size when the buffers that used them are garbage collected).
// Kernels are compiled from csrc/*.cu to PTX (`make ptx`), embedded in the
// binary with go:embed, and JIT-compiled by the driver when a Device opens.
//
// # Precision
//
// Matrix products run on tensor cores: cuBLAS (loaded at run time, never
// linked) with bf16 inputs and fp32 accumulation (Options.MatMul = "bf16",
// the default), or in plain fp32 ("fp32") for exact comparisons. Every
// other op computes in fp32 with fp32 (or wider) state and reductions.
package cuda

import "errors"

// ErrNotBuilt is returned by Open in a binary built without -tags cuda.
var ErrNotBuilt = errors.New("cuda: this binary was built without GPU support (rebuild with -tags cuda)")

// Options tune a Device.
type Options struct {
	// MatMul is the matrix-product precision: "bf16" (tensor cores, bf16
	// inputs, fp32 accumulation; the default) or "fp32".
	MatMul string
	// NoCublasLt makes bf16 products use cublasGemmEx instead of
	// cublasLtMatmul with a per-shape heuristic (the default).
	NoCublasLt bool
	// NoGemmTune keeps cuBLASLt's first-guess algorithm for each product
	// shape instead of timing its candidates on the first product of that
	// shape and keeping the fastest (the default).
	NoGemmTune bool
}

// GemmTuning is how the algorithm of one product shape (cuBLAS's
// column-major C[M,N] = op(A)·op(B), K terms) was chosen: cuBLASLt's
// heuristic offers candidates, best guess first; each was timed on the
// shape's first product and the fastest kept.
type GemmTuning struct {
	M, N, K        int
	TransA, TransB bool
	Accumulate     bool    // C += rather than C =
	Candidates     int     // algorithms offered
	Chosen         int     // index of the one kept, in the heuristic's order
	HeuristicMs    float64 // per product: the first guess; 0 when not timed
	ChosenMs       float64 // per product: the one kept; 0 when not timed
	Note           string  // why the candidates were not timed, if so
}

// Info describes an opened device.
type Info struct {
	Ordinal      int
	Name         string
	MemTotal     int64
	Driver       int // CUDA driver API version, e.g. 13000
	ComputeMajor int
	ComputeMinor int
	SMs          int
	CuBLAS       string // the cuBLAS library loaded (path or soname)
	UUID         string // "GPU-…", as NVML and nvidia-smi name the device
}

// InputCopyStats describes the bf16 copies a device keeps of matrix-product
// inputs (weights, saved activations, gradients).
type InputCopyStats struct {
	Copies      int   // ranges with a copy
	Bytes       int64 // bf16 bytes they cover
	Conversions int   // reads so far that had to (re)convert a kept input
}

// OpTime is the GPU time of one op over a timed span (Device.StartTiming),
// from stream events around each of its queued pieces of work: unlike a
// profile that synchronises after every op, the stream runs as it does in
// training.
type OpTime struct {
	Op       string  `json:"op"`
	Launches int     `json:"launches"` // pieces of queued work (an op may queue several)
	Ms       float64 `json:"ms"`
}
