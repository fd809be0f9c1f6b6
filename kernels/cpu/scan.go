package cpu

import (
	"math"
	"runtime"

	"github.com/bmojo/bmojo/kernels"
)

func softplus(x float64) float64 {
	if x > 20 {
		return x // log1p(exp(x)) == x to float64 precision, and exp would overflow sooner or later
	}
	return math.Log1p(math.Exp(x))
}

func silu(x float64) float64 { return x / (1 + math.Exp(-x)) }

// scanArgs are the validated slices of one SelectiveScan(Backward) call.
type scanArgs[F kernels.Float] struct {
	x, dt, dtBias, Alog, Bm, Cm, Dskip, z []F
	B, T, E, N                            int
}

func (be *Backend[F]) scanCheck(c *checker[F], x, dt, dtBias, Alog, Bm, Cm, Dskip, z kernels.Buffer, B, T, E, N int) scanArgs[F] {
	c.dims("B,T,E,N", B, T, E, N)
	return scanArgs[F]{
		x:      c.buf("x", x, B*T*E, "B*T*E"),
		dt:     c.buf("dt", dt, B*T*E, "B*T*E"),
		dtBias: c.buf("dtBias", dtBias, E, "E"),
		Alog:   c.buf("Alog", Alog, E*N, "E*N"),
		Bm:     c.buf("Bm", Bm, B*T*N, "B*T*N"),
		Cm:     c.buf("Cm", Cm, B*T*N, "B*T*N"),
		Dskip:  c.buf("Dskip", Dskip, E, "E"),
		z:      c.buf("z", z, B*T*E, "B*T*E"),
		B:      B, T: T, E: E, N: N,
	}
}

// scanCost is the rough operation count of one (b,e) channel, dominated by
// the T·N exponentials.
const expCost = 20

// SelectiveScan implements kernels.Backend. The state is float64 whatever
// F is, so the float64 backend stays exact for gradient checks and the
// float32 one loses nothing over long sequences.
func (be *Backend[F]) SelectiveScan(out, x, dt, dtBias, Alog, Bm, Cm, Dskip, z kernels.Buffer, B, T, E, N int) {
	c := be.check("selective_scan")
	a := be.scanCheck(c, x, dt, dtBias, Alog, Bm, Cm, Dskip, z, B, T, E, N)
	o := c.buf("out", out, B*T*E, "B*T*E")
	if !c.ok {
		return
	}
	parallel(B*E, T*N*expCost, func(_, lo, hi int) {
		h := make([]float64, N)
		A := make([]float64, N)
		for be := lo; be < hi; be++ {
			b, e := be/E, be%E
			for n := range A {
				A[n] = -math.Exp(float64(a.Alog[e*N+n]))
			}
			clear(h)
			bias, dsk := float64(a.dtBias[e]), float64(a.Dskip[e])
			for t := 0; t < T; t++ {
				i := (b*T+t)*E + e
				xv := float64(a.x[i])
				delta := softplus(float64(a.dt[i]) + bias)
				dx := delta * xv
				bm, cm := a.Bm[(b*T+t)*N:(b*T+t+1)*N], a.Cm[(b*T+t)*N:(b*T+t+1)*N]
				var y float64
				for n := range h {
					h[n] = math.Exp(delta*A[n])*h[n] + dx*float64(bm[n])
					y += h[n] * float64(cm[n])
				}
				y += dsk * xv
				o[i] = F(y * silu(float64(a.z[i])))
			}
		}
	})
}

// SelectiveScanBackward implements kernels.Backend. Workers split the
// channels e, so per-channel gradients (dtBias, Alog, Dskip) have one
// writer; dBm and dCm sum over channels and go to per-worker float64
// slots reduced in worker order afterwards.
func (be *Backend[F]) SelectiveScanBackward(dx, ddt, ddtBias, dAlog, dBm, dCm, dDskip, dz, dout, x, dt, dtBias, Alog, Bm, Cm, Dskip, z kernels.Buffer, B, T, E, N int) {
	c := be.check("selective_scan_backward")
	a := be.scanCheck(c, x, dt, dtBias, Alog, Bm, Cm, Dskip, z, B, T, E, N)
	do := c.buf("dout", dout, B*T*E, "B*T*E")
	gx := c.opt("dx", dx, B*T*E, "B*T*E")
	gdt := c.opt("ddt", ddt, B*T*E, "B*T*E")
	gbias := c.opt("ddtBias", ddtBias, E, "E")
	gA := c.opt("dAlog", dAlog, E*N, "E*N")
	gB := c.opt("dBm", dBm, B*T*N, "B*T*N")
	gC := c.opt("dCm", dCm, B*T*N, "B*T*N")
	gD := c.opt("dDskip", dDskip, E, "E")
	gz := c.opt("dz", dz, B*T*E, "B*T*E")
	if !c.ok {
		return
	}
	nw := runtime.GOMAXPROCS(0)
	slotB := make([][]float64, nw)
	slotC := make([][]float64, nw)
	parallel(E, B*T*N*expCost*3, func(w, lo, hi int) {
		var sB, sC []float64
		if gB != nil {
			sB = make([]float64, B*T*N)
			slotB[w] = sB
		}
		if gC != nil {
			sC = make([]float64, B*T*N)
			slotC[w] = sC
		}
		hs := make([]float64, T*N) // h_t of the current channel
		as := make([]float64, T*N) // exp(Δ_t·A) of the current channel
		deltas := make([]float64, T)
		A := make([]float64, N)
		dh := make([]float64, N)
		dA := make([]float64, N)
		for e := lo; e < hi; e++ {
			for n := range A {
				A[n] = -math.Exp(float64(a.Alog[e*N+n]))
			}
			clear(dA)
			bias, dsk := float64(a.dtBias[e]), float64(a.Dskip[e])
			var dBias, dD float64
			for b := 0; b < B; b++ {
				// Recompute this channel's states.
				for t := 0; t < T; t++ {
					i := (b*T+t)*E + e
					delta := softplus(float64(a.dt[i]) + bias)
					deltas[t] = delta
					dxv := delta * float64(a.x[i])
					bm := a.Bm[(b*T+t)*N : (b*T+t+1)*N]
					ht, at := hs[t*N:(t+1)*N], as[t*N:(t+1)*N]
					for n := range ht {
						at[n] = math.Exp(delta * A[n])
						var prev float64
						if t > 0 {
							prev = hs[(t-1)*N+n]
						}
						ht[n] = at[n]*prev + dxv*float64(bm[n])
					}
				}
				clear(dh) // a_{t+1}·dh_{t+1}, carried backwards
				for t := T - 1; t >= 0; t-- {
					i := (b*T+t)*E + e
					r := (b*T + t) * N
					xv, zv, g := float64(a.x[i]), float64(a.z[i]), float64(do[i])
					sz := sigmoid(zv)
					ht, at := hs[t*N:(t+1)*N], as[t*N:(t+1)*N]
					bm, cm := a.Bm[r:r+N], a.Cm[r:r+N]
					var y float64
					for n := range ht {
						y += ht[n] * float64(cm[n])
					}
					y += dsk * xv
					if gz != nil {
						gz[i] += F(g * y * sz * (1 + zv*(1-sz)))
					}
					dy := g * zv * sz
					dD += dy * xv
					delta := deltas[t]
					dxacc := dy * dsk
					var dDelta float64
					for n := range ht {
						dhn := dh[n] + dy*float64(cm[n])
						var prev float64
						if t > 0 {
							prev = hs[(t-1)*N+n]
						}
						if sC != nil {
							sC[r+n] += dy * ht[n]
						}
						if sB != nil {
							sB[r+n] += dhn * delta * xv
						}
						dxacc += dhn * delta * float64(bm[n])
						pa := prev * at[n]
						dDelta += dhn * (xv*float64(bm[n]) + pa*A[n])
						dA[n] += dhn * pa * delta
						dh[n] = dhn * at[n]
					}
					if gx != nil {
						gx[i] += F(dxacc)
					}
					du := dDelta * sigmoid(float64(a.dt[i])+bias)
					if gdt != nil {
						gdt[i] += F(du)
					}
					dBias += du
				}
			}
			if gbias != nil {
				gbias[e] += F(dBias)
			}
			if gD != nil {
				gD[e] += F(dD)
			}
			if gA != nil {
				for n := range dA {
					gA[e*N+n] += F(dA[n] * A[n]) // dA/dAlog = A
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
