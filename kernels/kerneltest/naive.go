package kerneltest

import (
	"math"
	"sort"

	"github.com/bmojo/bmojo/kernels"
)

// The naive references: float64, one loop nest per formula of
// kernels/backend.go and docs/model.md, no tiling, no parallelism, no merging.

func naiveEmbedding(table []float64, tokens []int32, Rw, d int) []float64 {
	out := make([]float64, Rw*d)
	for r := 0; r < Rw; r++ {
		copy(out[r*d:(r+1)*d], table[int(tokens[r])*d:])
	}
	return out
}

func naiveRMSNorm(x, g []float64, Rw, d int) (out, rstd []float64) {
	out, rstd = make([]float64, Rw*d), make([]float64, Rw)
	for r := 0; r < Rw; r++ {
		var ss float64
		for i := 0; i < d; i++ {
			ss += x[r*d+i] * x[r*d+i]
		}
		rstd[r] = 1 / math.Sqrt(ss/float64(d)+1e-5)
		for i := 0; i < d; i++ {
			out[r*d+i] = x[r*d+i] * rstd[r] * g[i]
		}
	}
	return out, rstd
}

func naiveMatMul(x, w []float64, Rw, N, K int) []float64 {
	out := make([]float64, Rw*N)
	for r := 0; r < Rw; r++ {
		for n := 0; n < N; n++ {
			var s float64
			for k := 0; k < K; k++ {
				s += x[r*K+k] * w[n*K+k]
			}
			out[r*N+n] = s
		}
	}
	return out
}

func naiveConv1d(x, w, bias []float64, B, T, E, K int) []float64 {
	out := make([]float64, B*T*E)
	for b := 0; b < B; b++ {
		for t := 0; t < T; t++ {
			for e := 0; e < E; e++ {
				s := bias[e]
				for k := 0; k < K; k++ {
					if ts := t - K + 1 + k; ts >= 0 {
						s += w[e*K+k] * x[(b*T+ts)*E+e]
					}
				}
				out[(b*T+t)*E+e] = s
			}
		}
	}
	return out
}

func naiveSiLU(x float64) float64 { return x / (1 + math.Exp(-x)) }

func mapSiLU(x []float64) []float64 {
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = naiveSiLU(v)
	}
	return out
}

func naiveSwiGLU(gate, up []float64) []float64 {
	out := make([]float64, len(gate))
	for i := range gate {
		out[i] = naiveSiLU(gate[i]) * up[i]
	}
	return out
}

func naiveScan(x, dt, dtBias, Alog, Bm, Cm, Dskip, z []float64, B, T, E, N int) []float64 {
	out := make([]float64, B*T*E)
	for b := 0; b < B; b++ {
		for e := 0; e < E; e++ {
			h := make([]float64, N)
			for t := 0; t < T; t++ {
				i := (b*T+t)*E + e
				delta := math.Log(1 + math.Exp(dt[i]+dtBias[e]))
				var y float64
				for n := 0; n < N; n++ {
					A := -math.Exp(Alog[e*N+n])
					h[n] = math.Exp(delta*A)*h[n] + delta*x[i]*Bm[(b*T+t)*N+n]
					y += h[n] * Cm[(b*T+t)*N+n]
				}
				out[i] = (y + Dskip[e]*x[i]) * naiveSiLU(z[i])
			}
		}
	}
	return out
}

func naiveRoPE(x []float64, B, T, nh, D int, theta float64) []float64 {
	out := make([]float64, len(x))
	h := D / 2
	for b := 0; b < B; b++ {
		for t := 0; t < T; t++ {
			for hd := 0; hd < nh; hd++ {
				o := ((b*T+t)*nh + hd) * D
				for i := 0; i < h; i++ {
					ang := float64(t) * math.Pow(theta, -2*float64(i)/float64(D))
					c, s := math.Cos(ang), math.Sin(ang)
					out[o+i] = x[o+i]*c - x[o+i+h]*s
					out[o+i+h] = x[o+i+h]*c + x[o+i]*s
				}
			}
		}
	}
	return out
}

// naiveMemory lists the memory positions of query t: every selected
// position of chunks 0..floor(t/C)−Delta in order, then the last M.
func naiveMemory(sel []int32, b, t int, s kernels.AttnShape) []int {
	if s.M == 0 {
		return nil
	}
	nC := s.T / s.C
	var all []int
	for c := 0; c <= t/s.C-s.Delta && c < nC; c++ {
		for i := 0; i < s.S; i++ {
			if p := sel[(b*nC+c)*s.S+i]; p >= 0 {
				all = append(all, int(p))
			}
		}
	}
	if len(all) > s.M {
		all = all[len(all)-s.M:]
	}
	return all
}

// naiveAttention is one softmax per query over the explicitly concatenated
// key list (context, then fading, then memory keys).
func naiveAttention(q, k, v, kf, vf, qm, km []float64, sel []int32, s kernels.AttnShape) (out, lse []float64) {
	out, lse = make([]float64, s.B*s.T*s.H*s.D), make([]float64, s.B*s.T*s.H)
	scale := 1 / math.Sqrt(float64(s.D))
	dot := func(a, b []float64) float64 {
		var x float64
		for i := range a {
			x += a[i] * b[i]
		}
		return x
	}
	for b := 0; b < s.B; b++ {
		for t := 0; t < s.T; t++ {
			for h := 0; h < s.H; h++ {
				g := h * s.G / s.H
				qo := ((b*s.T+t)*s.H + h) * s.D
				kv := func(j int) int { return ((b*s.T+j)*s.G + g) * s.D }
				var scores []float64
				var vals [][]float64
				for j := 0; j <= t; j++ {
					if j >= t-s.Wc+1 {
						scores = append(scores, dot(q[qo:qo+s.D], k[kv(j):kv(j)+s.D])*scale)
						vals = append(vals, v[kv(j):kv(j)+s.D])
					}
				}
				for j := 0; j <= t && s.Wf > 0; j++ {
					if j >= t-s.Wc-s.Wf+1 && j <= t-s.Wc {
						scores = append(scores, dot(q[qo:qo+s.D], kf[kv(j):kv(j)+s.D])*scale)
						vals = append(vals, vf[kv(j):kv(j)+s.D])
					}
				}
				for _, j := range naiveMemory(sel, b, t, s) {
					scores = append(scores, dot(qm[qo:qo+s.D], km[kv(j):kv(j)+s.D])*scale)
					vals = append(vals, v[kv(j):kv(j)+s.D])
				}
				m := math.Inf(-1)
				for _, x := range scores {
					m = math.Max(m, x)
				}
				var sum float64
				for _, x := range scores {
					sum += math.Exp(x - m)
				}
				for i, x := range scores {
					p := math.Exp(x-m) / sum
					for d := 0; d < s.D; d++ {
						out[qo+d] += p * vals[i][d]
					}
				}
				lse[(b*s.T+t)*s.H+h] = m + math.Log(sum)
			}
		}
	}
	return out, lse
}

func naiveShiftRows(x []float64, B, T, d int) []float64 {
	out := make([]float64, len(x))
	for b := 0; b < B; b++ {
		for t := 1; t < T; t++ {
			copy(out[(b*T+t)*d:(b*T+t+1)*d], x[(b*T+t-1)*d:])
		}
	}
	return out
}

func naiveInnovation(u, p []float64, Rw, d int) []float64 {
	e := make([]float64, Rw)
	for r := 0; r < Rw; r++ {
		for i := 0; i < d; i++ {
			df := u[r*d+i] - p[r*d+i]
			e[r] += df * df / float64(d)
		}
	}
	return e
}

// naiveSelect picks S times the largest remaining e of each chunk, scanning
// with >= so the later position wins a tie.
func naiveSelect(e []float64, B, T, C, S int) []int32 {
	nC := T / C
	sel := make([]int32, 0, B*nC*S)
	for b := 0; b < B; b++ {
		for c := 0; c < nC; c++ {
			taken := make([]bool, C)
			var picked []int
			for k := 0; k < S; k++ {
				best := -1
				for i := 0; i < C; i++ {
					if !taken[i] && (best < 0 || e[b*T+c*C+i] >= e[b*T+c*C+best]) {
						best = i
					}
				}
				taken[best] = true
				picked = append(picked, c*C+best)
			}
			sort.Ints(picked)
			for _, p := range picked {
				sel = append(sel, int32(p))
			}
		}
	}
	return sel
}

func naiveCrossEntropy(logits []float64, targets []int32, Rw, V int) []float64 {
	loss := make([]float64, Rw)
	for r := 0; r < Rw; r++ {
		if targets[r] < 0 {
			continue
		}
		var s float64
		for i := 0; i < V; i++ {
			s += math.Exp(logits[r*V+i])
		}
		loss[r] = math.Log(s) - logits[r*V+int(targets[r])]
	}
	return loss
}

func naiveAdamW(p, grad, m, v []float64, h kernels.AdamW) {
	for i := range p {
		g := grad[i]
		if h.GradScale != 0 {
			g *= h.GradScale
		}
		m[i] = h.Beta1*m[i] + (1-h.Beta1)*g
		v[i] = h.Beta2*v[i] + (1-h.Beta2)*g*g
		mh := m[i] / (1 - math.Pow(h.Beta1, float64(h.Step)))
		vh := v[i] / (1 - math.Pow(h.Beta2, float64(h.Step)))
		p[i] -= h.LR * (mh/(math.Sqrt(vh)+h.Eps) + h.WeightDecay*p[i])
	}
}
