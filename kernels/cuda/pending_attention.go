//go:build cuda

package cuda

// Placeholders until ops_attention.go lands; the helper writing it deletes this file.

import "github.com/bmojo/bmojo/kernels"

func (b *Backend) RoPE(out, x kernels.Buffer, B, T, nh, D int, theta float64) {
	b.failf("rope: not implemented yet")
}
func (b *Backend) RoPEBackward(dx, dout kernels.Buffer, B, T, nh, D int, theta float64) {
	b.failf("rope: not implemented yet")
}
func (b *Backend) Attention(out, lse, q, k, v, kf, vf, qm, km kernels.Buffer, sel kernels.IntBuffer, s kernels.AttnShape) {
	b.failf("attention: not implemented yet")
}
func (b *Backend) AttentionBackward(dq, dk, dv, dkf, dvf, dqm, dkm, dout, out, lse, q, k, v, kf, vf, qm, km kernels.Buffer, sel kernels.IntBuffer, s kernels.AttnShape) {
	b.failf("attention: not implemented yet")
}
func (b *Backend) ShiftRows(out, x kernels.Buffer, B, T, d int) {
	b.failf("shift_rows: not implemented yet")
}
func (b *Backend) Innovation(e, u, p kernels.Buffer, Rw, d int) {
	b.failf("innovation: not implemented yet")
}
func (b *Backend) InnovationBackward(dp, de, u, p kernels.Buffer, Rw, d int) {
	b.failf("innovation: not implemented yet")
}
func (b *Backend) SelectChunks(sel kernels.IntBuffer, e kernels.Buffer, B, T, C, S int) {
	b.failf("select_chunks: not implemented yet")
}
