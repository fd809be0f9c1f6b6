// Package profile wraps a kernels.Backend and times every op: each call
// waits for the device (Err) before and after it, so the time is the op's
// own, kernels included. It slows a step down and is meant for "which ops
// dominate" tables (bmojo bench step --profile), not for throughput.
package profile

// One method per kernels.Backend method, in the interface's order; the
// assertion at the end fails to compile when the interface gains one.

import (
	"sort"
	"time"

	"github.com/bmojo/bmojo/kernels"
)

// Backend is a timing wrapper around Inner.
type Backend[F kernels.Float] struct {
	Inner kernels.Backend[F]
	times map[string]time.Duration
	calls map[string]int
}

// Wrap returns a timing wrapper of be.
func Wrap[F kernels.Float](be kernels.Backend[F]) *Backend[F] {
	return &Backend[F]{Inner: be, times: map[string]time.Duration{}, calls: map[string]int{}}
}

func (p *Backend[F]) start() time.Time { p.Inner.Err(); return time.Now() }

func (p *Backend[F]) stop(op string, t0 time.Time) {
	p.Inner.Err()
	p.times[op] += time.Since(t0)
	p.calls[op]++
}

// Row is one op's total.
type Row struct {
	Op    string
	Calls int
	Time  time.Duration
}

// Rows returns the ops by total time, largest first.
func (p *Backend[F]) Rows() []Row {
	var r []Row
	for op, t := range p.times {
		r = append(r, Row{op, p.calls[op], t})
	}
	sort.Slice(r, func(i, j int) bool { return r[i].Time > r[j].Time })
	return r
}

// Reset clears the totals.
func (p *Backend[F]) Reset() {
	p.times, p.calls = map[string]time.Duration{}, map[string]int{}
}

// Name implements kernels.Backend.
func (pb *Backend[F]) Name() string {
	return pb.Inner.Name()
}

// Err implements kernels.Backend.
func (pb *Backend[F]) Err() error {
	return pb.Inner.Err()
}

// Alloc implements kernels.Backend.
func (pb *Backend[F]) Alloc(n int) kernels.Buffer {
	return pb.Inner.Alloc(n)
}

// AllocInt implements kernels.Backend.
func (pb *Backend[F]) AllocInt(n int) kernels.IntBuffer {
	return pb.Inner.AllocInt(n)
}

// Slice implements kernels.Backend.
func (pb *Backend[F]) Slice(b kernels.Buffer, off, n int) kernels.Buffer {
	return pb.Inner.Slice(b, off, n)
}

// Upload implements kernels.Backend.
func (pb *Backend[F]) Upload(dst kernels.Buffer, src []F) {
	defer pb.stop("Upload", pb.start())
	pb.Inner.Upload(dst, src)
}

// Download implements kernels.Backend.
func (pb *Backend[F]) Download(dst []F, src kernels.Buffer) {
	defer pb.stop("Download", pb.start())
	pb.Inner.Download(dst, src)
}

// UploadInt implements kernels.Backend.
func (pb *Backend[F]) UploadInt(dst kernels.IntBuffer, src []int32) {
	defer pb.stop("UploadInt", pb.start())
	pb.Inner.UploadInt(dst, src)
}

// DownloadInt implements kernels.Backend.
func (pb *Backend[F]) DownloadInt(dst []int32, src kernels.IntBuffer) {
	defer pb.stop("DownloadInt", pb.start())
	pb.Inner.DownloadInt(dst, src)
}

// Zero implements kernels.Backend.
func (pb *Backend[F]) Zero(x kernels.Buffer) {
	defer pb.stop("Zero", pb.start())
	pb.Inner.Zero(x)
}

// Copy implements kernels.Backend.
func (pb *Backend[F]) Copy(dst, src kernels.Buffer) {
	defer pb.stop("Copy", pb.start())
	pb.Inner.Copy(dst, src)
}

// CopyColumns implements kernels.Backend.
func (pb *Backend[F]) CopyColumns(dst, src kernels.Buffer, Rw, n, dCols, dc, sCols, sc int) {
	defer pb.stop("CopyColumns", pb.start())
	pb.Inner.CopyColumns(dst, src, Rw, n, dCols, dc, sCols, sc)
}

// MatMulAdd implements kernels.Backend.
func (pb *Backend[F]) MatMulAdd(out, r, x, w kernels.Buffer, Rw, N, K int) {
	defer pb.stop("MatMulAdd", pb.start())
	pb.Inner.MatMulAdd(out, r, x, w, Rw, N, K)
}

// Accumulate implements kernels.Backend.
func (pb *Backend[F]) Accumulate(dst, src kernels.Buffer) {
	defer pb.stop("Accumulate", pb.start())
	pb.Inner.Accumulate(dst, src)
}

// Scale implements kernels.Backend.
func (pb *Backend[F]) Scale(x kernels.Buffer, s float64) {
	defer pb.stop("Scale", pb.start())
	pb.Inner.Scale(x, s)
}

// SumSquares implements kernels.Backend.
func (pb *Backend[F]) SumSquares(x kernels.Buffer) float64 {
	defer pb.stop("SumSquares", pb.start())
	return pb.Inner.SumSquares(x)
}

// Embedding implements kernels.Backend.
func (pb *Backend[F]) Embedding(out, table kernels.Buffer, tokens kernels.IntBuffer, Rw, d int) {
	defer pb.stop("Embedding", pb.start())
	pb.Inner.Embedding(out, table, tokens, Rw, d)
}

// EmbeddingBackward implements kernels.Backend.
func (pb *Backend[F]) EmbeddingBackward(dtable, dout kernels.Buffer, tokens kernels.IntBuffer, Rw, d int) {
	defer pb.stop("EmbeddingBackward", pb.start())
	pb.Inner.EmbeddingBackward(dtable, dout, tokens, Rw, d)
}

// RMSNorm implements kernels.Backend.
func (pb *Backend[F]) RMSNorm(out, rstd, x, g kernels.Buffer, Rw, d int) {
	defer pb.stop("RMSNorm", pb.start())
	pb.Inner.RMSNorm(out, rstd, x, g, Rw, d)
}

// RMSNormBackward implements kernels.Backend.
func (pb *Backend[F]) RMSNormBackward(dx, dg, dout, x, g, rstd kernels.Buffer, Rw, d int) {
	defer pb.stop("RMSNormBackward", pb.start())
	pb.Inner.RMSNormBackward(dx, dg, dout, x, g, rstd, Rw, d)
}

// MatMul implements kernels.Backend.
func (pb *Backend[F]) MatMul(out, x, w kernels.Buffer, Rw, N, K int, accumulate bool) {
	defer pb.stop("MatMul", pb.start())
	pb.Inner.MatMul(out, x, w, Rw, N, K, accumulate)
}

// MatMulBackward implements kernels.Backend.
func (pb *Backend[F]) MatMulBackward(dx, dw, dout, x, w kernels.Buffer, Rw, N, K int) {
	defer pb.stop("MatMulBackward", pb.start())
	pb.Inner.MatMulBackward(dx, dw, dout, x, w, Rw, N, K)
}

// Conv1d implements kernels.Backend.
func (pb *Backend[F]) Conv1d(out, x, w, bias kernels.Buffer, B, T, E, K int) {
	defer pb.stop("Conv1d", pb.start())
	pb.Inner.Conv1d(out, x, w, bias, B, T, E, K)
}

// Conv1dBackward implements kernels.Backend.
func (pb *Backend[F]) Conv1dBackward(dx, dw, dbias, dout, x, w kernels.Buffer, B, T, E, K int) {
	defer pb.stop("Conv1dBackward", pb.start())
	pb.Inner.Conv1dBackward(dx, dw, dbias, dout, x, w, B, T, E, K)
}

// Conv1dSiLU implements kernels.Backend.
func (pb *Backend[F]) Conv1dSiLU(out, act, x, w, bias kernels.Buffer, B, T, E, K int) {
	defer pb.stop("Conv1dSiLU", pb.start())
	pb.Inner.Conv1dSiLU(out, act, x, w, bias, B, T, E, K)
}

// SiLU implements kernels.Backend.
func (pb *Backend[F]) SiLU(out, x kernels.Buffer) {
	defer pb.stop("SiLU", pb.start())
	pb.Inner.SiLU(out, x)
}

// SiLUBackward implements kernels.Backend.
func (pb *Backend[F]) SiLUBackward(dx, dout, x kernels.Buffer) {
	defer pb.stop("SiLUBackward", pb.start())
	pb.Inner.SiLUBackward(dx, dout, x)
}

// SiLUMatMulBackward implements kernels.Backend.
func (pb *Backend[F]) SiLUMatMulBackward(dx, dr, dout, w, x kernels.Buffer, Rw, N, K int) {
	defer pb.stop("SiLUMatMulBackward", pb.start())
	pb.Inner.SiLUMatMulBackward(dx, dr, dout, w, x, Rw, N, K)
}

// SelectiveScan implements kernels.Backend.
func (pb *Backend[F]) SelectiveScan(out, x, dt, dtBias, Alog, Bm, Cm, Dskip, z kernels.Buffer, B, T, E, N int) {
	defer pb.stop("SelectiveScan", pb.start())
	pb.Inner.SelectiveScan(out, x, dt, dtBias, Alog, Bm, Cm, Dskip, z, B, T, E, N)
}

// SelectiveScanBackward implements kernels.Backend.
func (pb *Backend[F]) SelectiveScanBackward(dx, ddt, ddtBias, dAlog, dBm, dCm, dDskip, dz, dout, x, dt, dtBias, Alog, Bm, Cm, Dskip, z kernels.Buffer, B, T, E, N int) {
	defer pb.stop("SelectiveScanBackward", pb.start())
	pb.Inner.SelectiveScanBackward(dx, ddt, ddtBias, dAlog, dBm, dCm, dDskip, dz, dout, x, dt, dtBias, Alog, Bm, Cm, Dskip, z, B, T, E, N)
}

// RoPE implements kernels.Backend.
func (pb *Backend[F]) RoPE(out, x kernels.Buffer, B, T, nh, D int, theta float64) {
	defer pb.stop("RoPE", pb.start())
	pb.Inner.RoPE(out, x, B, T, nh, D, theta)
}

// RoPEBackward implements kernels.Backend.
func (pb *Backend[F]) RoPEBackward(dx, dout kernels.Buffer, B, T, nh, D int, theta float64) {
	defer pb.stop("RoPEBackward", pb.start())
	pb.Inner.RoPEBackward(dx, dout, B, T, nh, D, theta)
}

// Attention implements kernels.Backend.
func (pb *Backend[F]) Attention(out, lse, q, k, v, kf, vf, qm, km kernels.Buffer, sel kernels.IntBuffer, s kernels.AttnShape) {
	defer pb.stop("Attention", pb.start())
	pb.Inner.Attention(out, lse, q, k, v, kf, vf, qm, km, sel, s)
}

// AttentionBackward implements kernels.Backend.
func (pb *Backend[F]) AttentionBackward(dq, dk, dv, dkf, dvf, dqm, dkm, dout, out, lse, q, k, v, kf, vf, qm, km kernels.Buffer, sel kernels.IntBuffer, s kernels.AttnShape) {
	defer pb.stop("AttentionBackward", pb.start())
	pb.Inner.AttentionBackward(dq, dk, dv, dkf, dvf, dqm, dkm, dout, out, lse, q, k, v, kf, vf, qm, km, sel, s)
}

// ShiftRows implements kernels.Backend.
func (pb *Backend[F]) ShiftRows(out, x kernels.Buffer, B, T, d int) {
	defer pb.stop("ShiftRows", pb.start())
	pb.Inner.ShiftRows(out, x, B, T, d)
}

// Innovation implements kernels.Backend.
func (pb *Backend[F]) Innovation(e, u, p kernels.Buffer, Rw, d int) {
	defer pb.stop("Innovation", pb.start())
	pb.Inner.Innovation(e, u, p, Rw, d)
}

// InnovationBackward implements kernels.Backend.
func (pb *Backend[F]) InnovationBackward(dp, de, u, p kernels.Buffer, Rw, d int) {
	defer pb.stop("InnovationBackward", pb.start())
	pb.Inner.InnovationBackward(dp, de, u, p, Rw, d)
}

// SelectChunks implements kernels.Backend.
func (pb *Backend[F]) SelectChunks(sel kernels.IntBuffer, e kernels.Buffer, B, T, C, S int) {
	defer pb.stop("SelectChunks", pb.start())
	pb.Inner.SelectChunks(sel, e, B, T, C, S)
}

// SwiGLU implements kernels.Backend.
func (pb *Backend[F]) SwiGLU(h, gate, up kernels.Buffer) {
	defer pb.stop("SwiGLU", pb.start())
	pb.Inner.SwiGLU(h, gate, up)
}

// SwiGLUBackward implements kernels.Backend.
func (pb *Backend[F]) SwiGLUBackward(dgate, dup, dh, gate, up kernels.Buffer) {
	defer pb.stop("SwiGLUBackward", pb.start())
	pb.Inner.SwiGLUBackward(dgate, dup, dh, gate, up)
}

// SwiGLUPacked implements kernels.Backend.
func (pb *Backend[F]) SwiGLUPacked(h, gu kernels.Buffer, Rw, Fw int) {
	defer pb.stop("SwiGLUPacked", pb.start())
	pb.Inner.SwiGLUPacked(h, gu, Rw, Fw)
}

// SwiGLUPackedBackward implements kernels.Backend.
func (pb *Backend[F]) SwiGLUPackedBackward(dgu, dh, gu kernels.Buffer, Rw, Fw int) {
	defer pb.stop("SwiGLUPackedBackward", pb.start())
	pb.Inner.SwiGLUPackedBackward(dgu, dh, gu, Rw, Fw)
}

// CrossEntropy implements kernels.Backend.
func (pb *Backend[F]) CrossEntropy(loss, logits kernels.Buffer, targets kernels.IntBuffer, Rw, V int) {
	defer pb.stop("CrossEntropy", pb.start())
	pb.Inner.CrossEntropy(loss, logits, targets, Rw, V)
}

// CrossEntropyBackward implements kernels.Backend.
func (pb *Backend[F]) CrossEntropyBackward(dlogits, logits kernels.Buffer, targets kernels.IntBuffer, scale float64, Rw, V int) {
	defer pb.stop("CrossEntropyBackward", pb.start())
	pb.Inner.CrossEntropyBackward(dlogits, logits, targets, scale, Rw, V)
}

// AdamWStep implements kernels.Backend.
func (pb *Backend[F]) AdamWStep(param, grad, m, v kernels.Buffer, h kernels.AdamW) {
	defer pb.stop("AdamWStep", pb.start())
	pb.Inner.AdamWStep(param, grad, m, v, h)
}

// AdamWSteps implements kernels.Backend.
func (pb *Backend[F]) AdamWSteps(param, grad, m, v kernels.Buffer, segs []kernels.AdamWSegment, h kernels.AdamW) {
	defer pb.stop("AdamWSteps", pb.start())
	pb.Inner.AdamWSteps(param, grad, m, v, segs, h)
}

var _ kernels.Backend[float32] = (*Backend[float32])(nil)
