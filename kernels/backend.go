// Package kernels owns the numerical operations of the B'MOJO model (see
// docs/model.md) behind one Backend interface. Its readable reference is
// kernels/kerneltest/naive.go (float64, one loop nest per formula); both
// backends, the tuned CPU one in kernels/cpu and the GPU one in kernels/cuda,
// are held to it by one conformance suite, kernels/kerneltest.
//
// This package must not know about models, training or I/O: it only moves
// numbers between buffers.
//
// # Shape legend
//
// One legend for every op, written as in the doc comments below:
//
//	B   batch (sequences)             T   sequence length
//	Rw  rows = B·T (or any row count) d   model width (d_model)
//	V   vocabulary                    E   SSM width (d_inner)
//	N   SSM state per channel         K   causal conv width
//	H   query heads                   G   key/value heads (n_kv_head)
//	D   head width                    F   SwiGLU hidden width
//	Wc  context window                Wf  fading window (0 = off)
//	C   chunk length                  S   selected tokens per chunk
//	M   eidetic memory capacity (0 = off)
//	nC  complete chunks = floor(T/C)  δ   memory delay in chunks
//
// Buffers are row-major; [B,T,E] means index (b·T+t)·E+e. Weights use the
// PyTorch Linear layout (out×in), so a linear layer is y = x·Wᵀ.
//
// # Conventions
//
//   - Forward ops overwrite their outputs.
//   - Backward ops ACCUMULATE (+=) into every gradient output (llm.c style),
//     so the caller zeroes gradients once per step and residual branches add
//     up naturally. A nil gradient output is skipped.
//   - Forward and backward of one op take their arguments in the same order.
//   - Ops do not return errors: a backend records the first failure (bad
//     shape, launch failure) and Err reports it; the model checks Err once
//     per step. After a failure, outputs are unspecified.
package kernels

// Float is the element type of a backend: float32 in production, float64
// for finite-difference gradient checks on the CPU backend.
type Float interface{ ~float32 | ~float64 }

// Buffer is an array of floats owned by a backend (host memory for the CPU
// backend, device memory for CUDA).
type Buffer interface{ Len() int }

// IntBuffer is an array of int32 owned by a backend (tokens, targets,
// selected positions).
type IntBuffer interface{ Len() int }

// AttnShape describes one call of the B'MOJO attention (docs/model.md §4).
type AttnShape struct {
	B, T int // batch, sequence length
	H, G int // query heads, key/value heads; query head h reads kv head h·G/H
	D    int // head width
	Wc   int // context window: keys j in [t-Wc+1, t]
	Wf   int // fading window: fading keys j in [t-Wc-Wf+1, t-Wc]; 0 = off
	C    int // chunk length for the eidetic memory
	S    int // selected positions per complete chunk (sel is [B, T/C, S])
	M    int // memory capacity; 0 = no memory keys
	// Delta is the visibility delay in chunks: positions selected in chunk c
	// are visible to queries of chunk c' only when c' >= c+Delta.
	Delta int
}

// AdamW holds the hyper-parameters of one AdamW update.
type AdamW struct {
	LR          float64 // learning rate of this step
	Beta1       float64 // first-moment decay (0.9)
	Beta2       float64 // second-moment decay (0.95)
	Eps         float64 // denominator epsilon (1e-8)
	WeightDecay float64 // decoupled weight decay; 0 for norms, biases, embeddings, A_log, D
	Step        int     // 1-based step number, for bias correction
	// GradScale multiplies grad before the update, rounded to the element
	// type as Scale rounds (gradient clipping without a pass of its own);
	// 0 means 1. grad itself is not changed.
	GradScale float64
}

// AdamWSegment is one range [Off, Off+N) of AdamWSteps' flat buffers and
// the weight decay it takes (a run of neighbouring tensors of one decay
// group).
type AdamWSegment struct {
	Off, N      int
	WeightDecay float64
}

// Backend is every operation the model needs. See the package comment for
// the shape legend and the accumulate-in-backward convention. The argument
// contract of every method that takes buffers (the length of each buffer,
// whether it is read, written or accumulated into, which may be nil) is
// declared once, in Contract (contract.go); every backend checks its calls
// against it.
type Backend[F Float] interface {
	// Name identifies the backend in logs and benchmark tables ("cpu", "cuda").
	Name() string
	// Err returns the first error recorded since the backend was created.
	Err() error

	// Alloc returns a zeroed buffer of n floats.
	Alloc(n int) Buffer
	// AllocInt returns a zeroed buffer of n int32.
	AllocInt(n int) IntBuffer
	// Slice returns a view of n elements of b starting at off (shares memory).
	Slice(b Buffer, off, n int) Buffer
	// Upload copies src into dst (len(src) == dst.Len()).
	Upload(dst Buffer, src []F)
	// Download copies src into dst (len(dst) == src.Len()).
	Download(dst []F, src Buffer)
	// UploadInt copies src into dst.
	UploadInt(dst IntBuffer, src []int32)
	// DownloadInt copies src into dst.
	DownloadInt(dst []int32, src IntBuffer)

	// Zero sets every element of x to 0.
	Zero(x Buffer)
	// Copy sets dst = src (same length).
	Copy(dst, src Buffer)
	// CopyColumns copies a block of columns between row-major matrices:
	// dst[r, dc+j] = src[r, sc+j] for r < Rw, j < n, with dst [Rw, dCols]
	// and src [Rw, sCols]; dst's other columns are left as they are. dst
	// and src must not overlap. It splits one product's output into the
	// inputs of several ops, and joins their gradients back into one.
	CopyColumns(dst, src Buffer, Rw, n, dCols, dc, sCols, sc int)
	// Accumulate sets dst += src (same length). Residual adds and their
	// backward both use it.
	Accumulate(dst, src Buffer)
	// Scale sets x *= s.
	Scale(x Buffer, s float64)
	// SumSquares returns Σ x² accumulated in float64 (for the global
	// gradient norm).
	SumSquares(x Buffer) float64

	// Embedding: out[Rw,d] = table[tokens[r], :]. tokens are in [0,V).
	Embedding(out, table Buffer, tokens IntBuffer, Rw, d int)
	// EmbeddingBackward: dtable[tokens[r], :] += dout[r, :].
	EmbeddingBackward(dtable, dout Buffer, tokens IntBuffer, Rw, d int)

	// RMSNorm: rstd[r] = 1/sqrt(mean(x[r]²)+1e-5); out[r] = x[r]·rstd[r]⊙g.
	// out, rstd: outputs. x[Rw,d], g[d].
	RMSNorm(out, rstd, x, g Buffer, Rw, d int)
	// RMSNormBackward: dx[Rw,d] +=, dg[d] += from dout[Rw,d], with x, g and
	// the rstd saved by RMSNorm.
	RMSNormBackward(dx, dg, dout, x, g, rstd Buffer, Rw, d int)

	// MatMul: out[Rw,N] = x[Rw,K]·w[N,K]ᵀ (out += when accumulate).
	MatMul(out, x, w Buffer, Rw, N, K int, accumulate bool)
	// MatMulAdd: out[Rw,N] = r[Rw,N] + x[Rw,K]·w[N,K]ᵀ, as Copy(out, r) then
	// an accumulating MatMul (a residual add). r may be out itself; x and w
	// must not overlap out.
	MatMulAdd(out, r, x, w Buffer, Rw, N, K int)
	// MatMulBackward: dx[Rw,K] += dout·w; dw[N,K] += doutᵀ·x.
	MatMulBackward(dx, dw, dout, x, w Buffer, Rw, N, K int)

	// Conv1d is the causal depthwise convolution with zero left padding:
	// out[b,t,e] = bias[e] + Σ_k w[e,k]·x[b,t-K+1+k,e] (x at t<0 is 0).
	// x, out: [B,T,E]; w: [E,K]; bias: [E].
	Conv1d(out, x, w, bias Buffer, B, T, E, K int)
	// Conv1dBackward: dx +=, dw +=, dbias += from dout.
	Conv1dBackward(dx, dw, dbias, dout, x, w Buffer, B, T, E, K int)

	// Conv1dSiLU is Conv1d into out, then SiLU(out) into act, in one pass
	// over x (Mamba's convolution and its activation): out is what the
	// backward reads (SiLUMatMulBackward's x), act what the next product
	// reads. out, act: [B,T,E].
	Conv1dSiLU(out, act, x, w, bias Buffer, B, T, E, K int)

	// SiLU: out = x·sigmoid(x), elementwise over n = out.Len().
	SiLU(out, x Buffer)
	// SiLUBackward: dx += dout·silu'(x).
	SiLUBackward(dx, dout, x Buffer)
	// SiLUMatMulBackward: dx += (dr + dout·w)⊙silu'(x), the backward of
	// h = SiLU(x) read by a product out = h·wᵀ (out's gradient dout [Rw,N],
	// w [N,K]) and by ops whose gradient into h is dr. x, dr, dx: [Rw,K].
	// It is MatMulBackward(dh, nil, dout, h, w) into dh = dr, then
	// SiLUBackward(dx, dh, x), without storing dh: Mamba's x_proj backward
	// joined to the SiLU's before it.
	SiLUMatMulBackward(dx, dr, dout, w, x Buffer, Rw, N, K int)

	// SelectiveScan is the Mamba-1 scan with its gate (docs/model.md §3):
	//
	//	Δ[b,t,e] = softplus(dt[b,t,e] + dtBias[e]);  A = -exp(Alog) [E,N]
	//	h_t[e,n] = exp(Δ·A[e,n])·h_{t-1}[e,n] + Δ·x[b,t,e]·Bm[b,t,n]   (h_{-1}=0, fp32 or wider)
	//	out[b,t,e] = (Σ_n h_t[e,n]·Cm[b,t,n] + Dskip[e]·x[b,t,e]) · SiLU(z[b,t,e])
	//
	// x, dt, z, out: [B,T,E]; Bm, Cm: [B,T,N]; dtBias, Dskip: [E]; Alog: [E,N].
	SelectiveScan(out, x, dt, dtBias, Alog, Bm, Cm, Dskip, z Buffer, B, T, E, N int)
	// SelectiveScanBackward accumulates the gradients of every input of
	// SelectiveScan from dout (the states are recomputed, not stored).
	SelectiveScanBackward(dx, ddt, ddtBias, dAlog, dBm, dCm, dDskip, dz, dout, x, dt, dtBias, Alog, Bm, Cm, Dskip, z Buffer, B, T, E, N int)

	// RoPE rotates x[B,T,nh,D] at absolute positions t (rotate-half pairs
	// (i, i+D/2), angle t·theta^(-2i/D)) into out.
	RoPE(out, x Buffer, B, T, nh, D int, theta float64)
	// RoPEBackward: dx += rotation by −angle of dout.
	RoPEBackward(dx, dout Buffer, B, T, nh, D int, theta float64)

	// Attention computes, for every query (b,t,h), one softmax with scale
	// 1/sqrt(D) over the union of context keys k (positions [t-Wc+1,t]),
	// fading keys kf (positions [t-Wc-Wf+1, t-Wc], values vf) and memory keys
	// (the last M positions of sel over chunks ≤ floor(t/C)-Delta, in
	// position order, values v), exactly as if the three sets were
	// concatenated (merged with log-sum-exp). Memory scores use qm·km, the
	// other scores q·k / q·kf. qm and km may be the same buffers as q and k.
	//
	// q, qm, out: [B,T,H,D]; k, v, kf, vf, km: [B,T,G,D]; sel: [B,nC,S];
	// lse: [B,T,H] output, the log-sum-exp of the scaled scores.
	// kf, vf may be nil when Wf = 0; sel, qm, km may be nil when M = 0.
	Attention(out, lse, q, k, v, kf, vf, qm, km Buffer, sel IntBuffer, s AttnShape)
	// AttentionBackward accumulates dq, dk, dv, dkf, dvf, dqm, dkm from dout,
	// given the forward inputs and the out and lse that Attention wrote.
	// When qm, km alias q, k the caller passes dqm, dkm aliasing dq, dk.
	AttentionBackward(dq, dk, dv, dkf, dvf, dqm, dkm, dout, out, lse, q, k, v, kf, vf, qm, km Buffer, sel IntBuffer, s AttnShape)

	// ShiftRows: out[b,t,:] = x[b,t-1,:], out[b,0,:] = 0. x, out: [B,T,d].
	// (The predictor input; it carries no gradient, see docs/model.md §4.)
	ShiftRows(out, x Buffer, B, T, d int)
	// Innovation: e[r] = mean_i (u[r,i] − p[r,i])². u, p: [Rw,d]; e: [Rw].
	Innovation(e, u, p Buffer, Rw, d int)
	// InnovationBackward: dp += de[r]·(−2/d)·(u − p). u gets no gradient
	// (stop-gradient, docs/model.md §4).
	InnovationBackward(dp, de, u, p Buffer, Rw, d int)
	// SelectChunks writes, for every complete chunk c of every sequence, the
	// S positions (absolute t) of the largest e in that chunk, ascending;
	// ties go to the later position. e: [B,T]; sel: [B,T/C,S].
	SelectChunks(sel IntBuffer, e Buffer, B, T, C, S int)

	// SwiGLU: h = SiLU(gate)⊙up. gate, up, h: [Rw,F].
	SwiGLU(h, gate, up Buffer)
	// SwiGLUBackward: dgate +=, dup += from dh.
	SwiGLUBackward(dgate, dup, dh, gate, up Buffer)

	// SwiGLUPacked is SwiGLU on the two halves of each row of gu [Rw,2F],
	// the output of one product with W_gate and W_up stacked ([2F,d]):
	// h[r,i] = SiLU(gu[r,i])·gu[r,F+i]. h: [Rw,F].
	SwiGLUPacked(h, gu Buffer, Rw, F int)
	// SwiGLUPackedBackward is SwiGLUBackward into the two halves of dgu
	// [Rw,2F] (dgate in columns [0,F), dup in [F,2F)) from dh [Rw,F]; SiLU
	// is recomputed from gu, not stored.
	SwiGLUPackedBackward(dgu, dh, gu Buffer, Rw, F int)

	// CrossEntropy: loss[r] = logsumexp(logits[r]) − logits[r, targets[r]],
	// or 0 where targets[r] < 0 (ignored). logits: [Rw,V].
	CrossEntropy(loss, logits Buffer, targets IntBuffer, Rw, V int)
	// CrossEntropyBackward: dlogits[r] += scale·(softmax(logits[r]) −
	// onehot(targets[r])) for labelled rows; ignored rows get nothing.
	CrossEntropyBackward(dlogits, logits Buffer, targets IntBuffer, scale float64, Rw, V int)

	// AdamWStep updates param in place from grad with moments m, v (all n
	// long) using decoupled weight decay: p -= lr·(m̂/(sqrt(v̂)+eps) + wd·p).
	AdamWStep(param, grad, m, v Buffer, h AdamW)
	// AdamWSteps is AdamWStep on every segment s of the flat buffers, as
	// AdamWStep(Slice(param, s.Off, s.N), …, h with WeightDecay =
	// s.WeightDecay), h.WeightDecay unused; elements outside the segments
	// are left as they are. Segments are ascending and do not overlap
	// (CheckSegments). It is the optimizer's multi-tensor apply: on a GPU
	// one launch for every tensor instead of one per tensor.
	AdamWSteps(param, grad, m, v Buffer, segs []AdamWSegment, h AdamW)
}

// AsyncCopier is implemented by backends that can copy between host memory
// and their own while later ops run: the CUDA backend, through page-locked
// staging memory and a second stream. A data-parallel worker downloads each
// layer's gradients as backward produces them and all-reduces them while
// backward goes on; with Download, the caller waits for every queued op
// and the device idles until it queues more.
//
// Both copies take their place in the op order where they are called, as
// Download and Upload do, and return at once. The wait function they return
// may be called from any goroutine. It returns once the copy is done (or
// known not to run): nil, or the first error the backend recorded (what Err
// reports, without waiting for other work), as after a failure outputs are
// unspecified. Calling it again returns the same result. Every copy must be
// waited for: until then it holds the backend's staging memory.
//
// The CPU backend copies at once; it implements AsyncCopier so that callers
// have one path to test.
type AsyncCopier[F Float] interface {
	// DownloadAsync copies src into dst (len(dst) == src.Len()) as Download
	// would at this point of the op order. Until wait returns, dst belongs
	// to the copy, and ops issued after DownloadAsync must not write src.
	DownloadAsync(dst []F, src Buffer) (wait func() error)
	// UploadAsync copies src into dst (len(src) == dst.Len()) as Upload
	// would at this point of the op order: ops issued after it read the
	// new values. src must stay unchanged until wait returns.
	UploadAsync(dst Buffer, src []F) (wait func() error)
}
