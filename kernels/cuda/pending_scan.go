//go:build cuda

package cuda

// Placeholders until ops_scan.go lands; the helper writing it deletes this file.

import "github.com/bmojo/bmojo/kernels"

func (b *Backend) SiLU(out, x kernels.Buffer)              { b.failf("silu: not implemented yet") }
func (b *Backend) SiLUBackward(dx, dout, x kernels.Buffer) { b.failf("silu: not implemented yet") }
func (b *Backend) Conv1d(out, x, w, bias kernels.Buffer, B, T, E, K int) {
	b.failf("conv1d: not implemented yet")
}
func (b *Backend) Conv1dBackward(dx, dw, dbias, dout, x, w kernels.Buffer, B, T, E, K int) {
	b.failf("conv1d: not implemented yet")
}
func (b *Backend) SelectiveScan(out, x, dt, dtBias, Alog, Bm, Cm, Dskip, z kernels.Buffer, B, T, E, N int) {
	b.failf("selective_scan: not implemented yet")
}
func (b *Backend) SelectiveScanBackward(dx, ddt, ddtBias, dAlog, dBm, dCm, dDskip, dz, dout, x, dt, dtBias, Alog, Bm, Cm, Dskip, z kernels.Buffer, B, T, E, N int) {
	b.failf("selective_scan: not implemented yet")
}
