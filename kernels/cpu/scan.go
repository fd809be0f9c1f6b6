package cpu

import (
	"math"
	"runtime"

	"github.com/bmojo/bmojo/kernels"
)

// softplusSig returns softplus(x) = log(1+eˣ) and its derivative
// sigmoid(x) from one exponential. The float32 backend takes log(1+y)
// through math.Log (assembly) instead of the pure-Go Log1p: for y ≥ 1e-7
// the relative error is ≤ 1e-9, below that log(1+y) = y to float32
// precision.
func softplusSig[F kernels.Float](x float64) (sp, sig float64) {
	y := expOf[F](-math.Abs(x)) // in (0, 1]
	var l float64
	switch {
	case !is32[F]():
		l = math.Log1p(y)
	case y < 1e-7:
		l = y
	default:
		l = math.Log(1 + y)
	}
	if x >= 0 {
		return x + l, 1 / (1 + y)
	}
	return l, y / (1 + y)
}

func silu[F kernels.Float](x float64) float64 { return x * sigmoid[F](x) }

// scanArgs are the validated slices of one SelectiveScan(Backward) call.
type scanArgs[F kernels.Float] struct {
	x, dt, dtBias, Alog, Bm, Cm, Dskip, z []F
	B, T, E, N                            int
}

// scanInputs returns the inputs x to z of a checked scan call, from argument
// in on (kernels.OpSelectiveScan and OpSelectiveScanBackward).
func scanInputs[F kernels.Float](c *checker[F], in, B, T, E, N int) scanArgs[F] {
	f := c.f[in:]
	return scanArgs[F]{x: f[0], dt: f[1], dtBias: f[2], Alog: f[3], Bm: f[4], Cm: f[5], Dskip: f[6], z: f[7], B: B, T: T, E: E, N: N}
}

// expCost is the rough operation count of one exponential, which dominates
// the scan (T·N of them per channel).
const expCost = 20

// scanBlock channels are processed together so every [B,T,E] access reads
// scanBlock contiguous elements instead of striding by E.
const scanBlock = 16

// expInto sets dst[n] = exp(s·a[n] − c): the polynomial expScaled for
// float32 backends, math.Exp for float64 ones (see expFast).
func expInto[F kernels.Float](dst, a []float64, s, c float64) {
	if is32[F]() {
		expScaled(dst, a, s, c)
		return
	}
	a = a[:len(dst)]
	for n := range dst {
		dst[n] = math.Exp(s*a[n] - c)
	}
}

func negExp[F kernels.Float](dst []float64, alog []F) {
	for n, v := range alog {
		dst[n] = -math.Exp(float64(v))
	}
}

// SelectiveScan implements kernels.Backend. The state is float64 whatever
// F is, so the float64 backend stays exact for gradient checks and the
// float32 one loses nothing over long sequences.
func (be *Backend[F]) SelectiveScan(out, x, dt, dtBias, Alog, Bm, Cm, Dskip, z kernels.Buffer, B, T, E, N int) {
	c := be.check(kernels.OpSelectiveScan, []int{B, T, E, N}, out, x, dt, dtBias, Alog, Bm, Cm, Dskip, z)
	if !c.ok {
		return
	}
	o, a := c.f[0], scanInputs(c, 1, B, T, E, N)
	nEB := (E + scanBlock - 1) / scanBlock
	parallel(B*nEB, T*N*scanBlock*expCost, func(_, lo, hi int) {
		h := make([]float64, scanBlock*N)
		A := make([]float64, scanBlock*N)
		decay := make([]float64, N) // exp(Δ·A[e,n]) of the current step
		bm, cm := make([]float64, N), make([]float64, N)
		for task := lo; task < hi; task++ {
			b, e0 := task/nEB, task%nEB*scanBlock
			ne := min(scanBlock, E-e0)
			negExp(A[:ne*N], a.Alog[e0*N:(e0+ne)*N])
			clear(h)
			for t := 0; t < T; t++ {
				r := b*T + t
				for n := range bm {
					bm[n], cm[n] = float64(a.Bm[r*N+n]), float64(a.Cm[r*N+n])
				}
				for j := 0; j < ne; j++ {
					e, i := e0+j, r*E+e0+j
					xv := float64(a.x[i])
					delta, _ := softplusSig[F](float64(a.dt[i]) + float64(a.dtBias[e]))
					dx := delta * xv
					hj := h[j*N : (j+1)*N]
					expInto[F](decay, A[j*N:(j+1)*N], delta, 0)
					var y float64
					for n := range hj {
						hj[n] = decay[n]*hj[n] + dx*bm[n]
						y += hj[n] * cm[n]
					}
					y += float64(a.Dskip[e]) * xv
					o[i] = F(y * silu[F](float64(a.z[i])))
				}
			}
		}
	})
}

// SelectiveScanBackward implements kernels.Backend. Workers split the
// channels e in blocks, so per-channel gradients (dtBias, Alog, Dskip) have
// one writer; dBm and dCm sum over channels and go to per-worker float64
// slots reduced in worker order afterwards (deterministic for a given
// GOMAXPROCS). A block's [T] columns are gathered into contiguous scratch
// first, then each channel's T×N states are recomputed and walked back.
func (be *Backend[F]) SelectiveScanBackward(dx, ddt, ddtBias, dAlog, dBm, dCm, dDskip, dz, dout, x, dt, dtBias, Alog, Bm, Cm, Dskip, z kernels.Buffer, B, T, E, N int) {
	c := be.check(kernels.OpSelectiveScanBackward, []int{B, T, E, N},
		dx, ddt, ddtBias, dAlog, dBm, dCm, dDskip, dz, dout, x, dt, dtBias, Alog, Bm, Cm, Dskip, z)
	if !c.ok {
		return
	}
	g := c.f
	gx, gdt, gbias, gA, gB, gC, gD, gz, do := g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8]
	a := scanInputs(c, 9, B, T, E, N)
	nw := runtime.GOMAXPROCS(0)
	slotB := make([][]float64, nw)
	slotC := make([][]float64, nw)
	nEB := (E + scanBlock - 1) / scanBlock
	parallel(nEB, B*T*N*scanBlock*expCost*3, func(w, lo, hi int) {
		// Allocated even when dBm or dCm is nil, to keep the inner loop
		// free of branches; reduceSlots skips them then.
		sB, sC := make([]float64, B*T*N), make([]float64, B*T*N)
		slotB[w], slotC[w] = sB, sC
		hs := make([]float64, T*N)   // h_t of the current channel
		as := make([]float64, T*N)   // exp(Δ_t·A) of the current channel
		deltas := make([]float64, T) // Δ_t of the current channel
		sigs := make([]float64, T)   // dΔ/ddt = sigmoid(dt+dtBias)
		bmF, cmF := make([]float64, T*N), make([]float64, T*N)
		// Gathered columns of the block, [scanBlock][T]: inputs, then the
		// per-element gradients written back after the block.
		cx, cdt, cz, cg := make([]float64, scanBlock*T), make([]float64, scanBlock*T), make([]float64, scanBlock*T), make([]float64, scanBlock*T)
		gxc, gdtc, gzc := make([]float64, scanBlock*T), make([]float64, scanBlock*T), make([]float64, scanBlock*T)
		A := make([]float64, N)
		dh := make([]float64, N)
		zeros := make([]float64, N) // h_{-1}
		gAcc := make([]float64, scanBlock*N)
		for eb := lo; eb < hi; eb++ {
			e0 := eb * scanBlock
			ne := min(scanBlock, E-e0)
			var dBias, dD [scanBlock]float64
			clear(gAcc)
			for b := 0; b < B; b++ {
				for i, v := range a.Bm[b*T*N : (b+1)*T*N] {
					bmF[i] = float64(v)
				}
				for i, v := range a.Cm[b*T*N : (b+1)*T*N] {
					cmF[i] = float64(v)
				}
				for t := 0; t < T; t++ {
					i := (b*T+t)*E + e0
					for j := 0; j < ne; j++ {
						cx[j*T+t], cdt[j*T+t] = float64(a.x[i+j]), float64(a.dt[i+j])
						cz[j*T+t], cg[j*T+t] = float64(a.z[i+j]), float64(do[i+j])
					}
				}
				for j := 0; j < ne; j++ {
					e := e0 + j
					negExp(A, a.Alog[e*N:(e+1)*N])
					dA := gAcc[j*N : (j+1)*N]
					bias, dsk := float64(a.dtBias[e]), float64(a.Dskip[e])
					xs, dts, zs, gs := cx[j*T:(j+1)*T], cdt[j*T:(j+1)*T], cz[j*T:(j+1)*T], cg[j*T:(j+1)*T]
					// Recompute this channel's states.
					for t := 0; t < T; t++ {
						delta, sig := softplusSig[F](dts[t] + bias)
						deltas[t], sigs[t] = delta, sig
						dxv := delta * xs[t]
						bm := bmF[t*N : (t+1)*N]
						ht, at := hs[t*N:(t+1)*N], as[t*N:(t+1)*N]
						expInto[F](at, A, delta, 0)
						hp := zeros
						if t > 0 {
							hp = hs[(t-1)*N : t*N]
						}
						hp, at, bm = hp[:len(ht)], at[:len(ht)], bm[:len(ht)]
						for n := range ht {
							ht[n] = at[n]*hp[n] + dxv*bm[n]
						}
					}
					clear(dh) // a_{t+1}·dh_{t+1}, carried backwards
					for t := T - 1; t >= 0; t-- {
						r := (b*T + t) * N
						xv, zv, g := xs[t], zs[t], gs[t]
						sz := sigmoid[F](zv)
						ht := hs[t*N : (t+1)*N]
						at, bm, cm := as[t*N:(t+1)*N], bmF[t*N:(t+1)*N], cmF[t*N:(t+1)*N]
						hp := zeros
						if t > 0 {
							hp = hs[(t-1)*N : t*N]
						}
						sBt, sCt := sB[r:r+N], sC[r:r+N]
						at, bm, cm, hp, sBt, sCt = at[:len(ht)], bm[:len(ht)], cm[:len(ht)], hp[:len(ht)], sBt[:len(ht)], sCt[:len(ht)]
						dh, A, dA := dh[:len(ht)], A[:len(ht)], dA[:len(ht)]
						var y float64
						for n := range ht {
							y += ht[n] * cm[n]
						}
						y += dsk * xv
						gzc[j*T+t] = g * y * sz * (1 + zv*(1-sz))
						dy := g * zv * sz
						dD[j] += dy * xv
						delta := deltas[t]
						dx := delta * xv
						dxacc := dy * dsk
						var dDelta float64
						for n := range ht {
							dhn := dh[n] + dy*cm[n]
							sCt[n] += dy * ht[n]
							sBt[n] += dhn * dx
							dxacc += dhn * delta * bm[n]
							pa := hp[n] * at[n]
							dDelta += dhn * (xv*bm[n] + pa*A[n])
							dA[n] += dhn * pa * delta
							dh[n] = dhn * at[n]
						}
						gxc[j*T+t] = dxacc
						du := dDelta * sigs[t]
						gdtc[j*T+t] = du
						dBias[j] += du
					}
				}
				for t := 0; t < T; t++ {
					i := (b*T+t)*E + e0
					for j := 0; j < ne; j++ {
						if gx != nil {
							gx[i+j] += F(gxc[j*T+t])
						}
						if gdt != nil {
							gdt[i+j] += F(gdtc[j*T+t])
						}
						if gz != nil {
							gz[i+j] += F(gzc[j*T+t])
						}
					}
				}
			}
			for j := 0; j < ne; j++ {
				e := e0 + j
				if gbias != nil {
					gbias[e] += F(dBias[j])
				}
				if gD != nil {
					gD[e] += F(dD[j])
				}
				if gA != nil {
					negExp(A, a.Alog[e*N:(e+1)*N])
					for n := range A {
						gA[e*N+n] += F(gAcc[j*N+n] * A[n]) // dA/dAlog = A
					}
				}
			}
		}
	})
	reduceSlots(gB, slotB)
	reduceSlots(gC, slotC)
}

func reduceSlots[F kernels.Float](dst []F, slots [][]float64) {
	if dst == nil {
		return
	}
	acc := make([]float64, len(dst))
	for _, s := range slots {
		for i, v := range s {
			acc[i] += v
		}
	}
	for i, v := range acc {
		dst[i] += F(v)
	}
}
