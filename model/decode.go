package model

import (
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
)

// Decoder runs the network one token at a time on the host, for text
// generation. It implements docs/model.md §2–§4 exactly as the full-sequence
// forward pass does (Model.ForwardLogits on kernels/cpu is the reference it
// is tested against), in float32 storage with float64 accumulation, but
// carries the sequence in a fixed-size state instead of recomputing it.
//
// The state of one layer is bounded whatever the number of tokens consumed:
//
//   - SSM (bmojo, mamba): the last K−1 conv inputs (K−1)·E and the scan
//     state h, E·N (float64);
//   - attention (bmojo, attention): a ring of the last w_c RoPE'd keys and
//     values, 2·w_c·G·D;
//   - fading path (bmojo, w_f > 0): a ring of the last w_c+w_f fading keys
//     k̃_j = RoPE(W_k f_j, j) and values ṽ_j = W_v f_j, 2·(w_c+w_f)·G·D;
//   - eidetic memory (bmojo, M > 0): the previous SSM output f_{t−1} (d), the
//     current chunk's innovation scores and memory keys/values (C·(2·G·D+1)),
//     the selections of the last δ completed chunks not yet visible
//     (2·δ·k_sel·G·D) and the memory itself (2·M·G·D, FIFO).
//
// That is O(w_c + w_f + C + δ·k_sel + M) vectors per layer; StateFloats
// reports the exact count, which is allocated once by NewDecoder and never
// grows.
//
// A Decoder is not safe for concurrent use.
type Decoder struct {
	cfg    Config
	embed  []float32 // V×d, tied LM head
	normF  []float32
	layers []decLayer
	t      int // tokens consumed = absolute position of the next token

	// RoPE angles of the current position, shared by every layer.
	ropeFreq, ropeCos, ropeSin []float64
	scale                      float64

	// scratch, reused by every layer and step
	x, mid, u, u2, f, pred []float32
	aPre, z, a, dt, y      []float32
	dlt, bm, cm            []float32
	q, k, v, qr, kr        []float32
	kf, vf, o              []float32
	gate, up, hid          []float32
	logits                 []float32
	x64                    []float64
	scores                 []float64
	vals                   [][]float32
	acc                    []float64
	order                  []int
}

type decLayer struct {
	mixer string
	// weights (views into one float32 copy of the parameters)
	norm1, norm2                                         []float32
	inProj, convW, convB, xProj, dtW, dtB, dSkip, outPro []float32
	negA                                                 []float64 // −exp(A_log), E×N
	wq, wk, wv, wo, wp                                   []float32
	wGate, wUp, wDown                                    []float32

	// SSM state
	conv []float32 // (K−1)×E: conv inputs of positions t−K+1 .. t−1, oldest first
	h    []float64 // E×N

	// attention state
	ctxK, ctxV []float32 // w_c rows of G·D, row j % w_c
	fadK, fadV []float32 // (w_c+w_f) rows of G·D, row j % (w_c+w_f)

	// eidetic memory state
	fPrev           []float32 // f_{t−1}, zero at t = 0
	chunkE          []float32 // innovation of the current chunk's positions
	chunkK, chunkV  []float32 // C rows: memory keys (RoPE'd or raw) and values
	pendPos         []int     // δ·k_sel selections awaiting visibility, chunk ring
	pendK, pendV    []float32
	pendHead, pendN int   // oldest pending chunk slot, pending chunks
	memPos          []int // M entries, FIFO ring
	memK, memV      []float32
	memHead, memN   int
}

// NewDecoder builds a decoder for config c with params in Layout order (as
// returned by Model.ParamsHost or ParamsF32, or held by a checkpoint). It
// keeps its own float32 copy.
func NewDecoder[P float32 | float64](c Config, params []P) (*Decoder, error) {
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("decoder: %w", err)
	}
	l := NewLayout(c)
	if len(params) != l.Total {
		return nil, fmt.Errorf("decoder: %d parameters given, config needs %d", len(params), l.Total)
	}
	p32 := make([]float32, len(params))
	for i, x := range params {
		p32[i] = float32(x)
	}
	var missing error
	get := func(name string) []float32 {
		ts, ok := l.Lookup(name)
		if !ok {
			if missing == nil {
				missing = fmt.Errorf("decoder: layout has no tensor %q", name)
			}
			return nil
		}
		return p32[ts.Offset : ts.Offset+ts.Size()]
	}
	d, E, N, K := c.DModel, c.DInner, c.DState, c.DConv
	H, G, D := c.NHead, c.NKVHead, c.HeadDim
	GD := G * D
	dec := &Decoder{cfg: c, embed: get("embed.weight"), normF: get("norm_f.weight")}
	hasAttn, hasSSM := false, false
	for i, m := range c.Mixers {
		p := fmt.Sprintf("layers.%d.", i)
		ly := decLayer{mixer: m, norm1: get(p + "norm1.weight")}
		if m == MixerBMOJO || m == MixerMamba {
			hasSSM = true
			ly.inProj, ly.convW, ly.convB = get(p+"ssm.in_proj.weight"), get(p+"ssm.conv.weight"), get(p+"ssm.conv.bias")
			ly.xProj, ly.dtW, ly.dtB = get(p+"ssm.x_proj.weight"), get(p+"ssm.dt_proj.weight"), get(p+"ssm.dt_proj.bias")
			ly.dSkip, ly.outPro = get(p+"ssm.D"), get(p+"ssm.out_proj.weight")
			alog := get(p + "ssm.A_log")
			ly.negA = make([]float64, len(alog))
			for j, v := range alog {
				ly.negA[j] = -math.Exp(float64(v))
			}
			ly.conv = make([]float32, (K-1)*E)
			ly.h = make([]float64, E*N)
		}
		if m == MixerBMOJO || m == MixerAttention {
			hasAttn = true
			ly.wq, ly.wk = get(p+"attn.q_proj.weight"), get(p+"attn.k_proj.weight")
			ly.wv, ly.wo = get(p+"attn.v_proj.weight"), get(p+"attn.o_proj.weight")
			ly.ctxK, ly.ctxV = make([]float32, c.Window*GD), make([]float32, c.Window*GD)
		}
		if m == MixerBMOJO && c.FadingWindow > 0 {
			n := (c.Window + c.FadingWindow) * GD
			ly.fadK, ly.fadV = make([]float32, n), make([]float32, n)
		}
		if m == MixerBMOJO && c.HasMemory() {
			ly.wp = get(p + "attn.predictor.weight")
			ly.fPrev = make([]float32, d)
			ly.chunkE = make([]float32, c.Chunk)
			ly.chunkK, ly.chunkV = make([]float32, c.Chunk*GD), make([]float32, c.Chunk*GD)
			np := c.MemoryDelay() * c.SelectPerChunk
			ly.pendPos = make([]int, np)
			ly.pendK, ly.pendV = make([]float32, np*GD), make([]float32, np*GD)
			ly.memPos = make([]int, c.Memory)
			ly.memK, ly.memV = make([]float32, c.Memory*GD), make([]float32, c.Memory*GD)
		}
		if c.HasMLP() {
			ly.norm2 = get(p + "norm2.weight")
			ly.wGate, ly.wUp, ly.wDown = get(p+"mlp.gate_proj.weight"), get(p+"mlp.up_proj.weight"), get(p+"mlp.down_proj.weight")
		}
		dec.layers = append(dec.layers, ly)
	}
	if missing != nil {
		return nil, missing
	}
	dec.x, dec.mid, dec.u, dec.u2 = make([]float32, d), make([]float32, d), make([]float32, d), make([]float32, d)
	dec.f, dec.pred = make([]float32, d), make([]float32, d)
	dec.logits = make([]float32, c.VocabSize)
	dec.x64 = make([]float64, max(d, E, c.DFF, H*D, c.DtRank))
	if hasSSM {
		R := c.DtRank
		dec.aPre, dec.z, dec.a = make([]float32, E), make([]float32, E), make([]float32, E)
		dec.dt, dec.y = make([]float32, E), make([]float32, E)
		dec.dlt, dec.bm, dec.cm = make([]float32, R), make([]float32, N), make([]float32, N)
	}
	if hasAttn {
		dec.q, dec.qr, dec.o = make([]float32, H*D), make([]float32, H*D), make([]float32, H*D)
		dec.k, dec.v, dec.kr = make([]float32, GD), make([]float32, GD), make([]float32, GD)
		dec.kf, dec.vf = make([]float32, GD), make([]float32, GD)
		nk := c.Window + c.FadingWindow + c.Memory
		dec.scores, dec.vals = make([]float64, nk), make([][]float32, nk)
		dec.acc = make([]float64, D)
		dec.ropeFreq = make([]float64, D/2)
		dec.ropeCos, dec.ropeSin = make([]float64, D/2), make([]float64, D/2)
		for i := range dec.ropeFreq {
			dec.ropeFreq[i] = math.Pow(c.RopeTheta, -2*float64(i)/float64(D))
		}
		dec.scale = 1 / math.Sqrt(float64(D))
		dec.order = make([]int, c.Chunk)
	}
	if c.HasMLP() {
		dec.gate, dec.up, dec.hid = make([]float32, c.DFF), make([]float32, c.DFF), make([]float32, c.DFF)
	}
	return dec, nil
}

// Config returns the decoder's model config.
func (d *Decoder) Config() Config { return d.cfg }

// Pos returns the number of tokens consumed since the last Reset: the
// absolute position the next Step's token takes.
func (d *Decoder) Pos() int { return d.t }

// Reset forgets every consumed token; the next Step is position 0.
func (d *Decoder) Reset() {
	d.t = 0
	for i := range d.layers {
		ly := &d.layers[i]
		clear(ly.conv)
		clear(ly.h)
		clear(ly.ctxK)
		clear(ly.ctxV)
		clear(ly.fadK)
		clear(ly.fadV)
		clear(ly.fPrev)
		clear(ly.chunkE)
		clear(ly.chunkK)
		clear(ly.chunkV)
		clear(ly.pendPos)
		clear(ly.pendK)
		clear(ly.pendV)
		clear(ly.memPos)
		clear(ly.memK)
		clear(ly.memV)
		ly.pendHead, ly.pendN, ly.memHead, ly.memN = 0, 0, 0, 0
	}
}

// StateFloats is the number of floats the decoder keeps between steps (its
// sequence state, not weights or scratch). It depends only on the config.
func (d *Decoder) StateFloats() int {
	n := 0
	for i := range d.layers {
		ly := &d.layers[i]
		for _, s := range [][]float32{ly.conv, ly.ctxK, ly.ctxV, ly.fadK, ly.fadV, ly.fPrev,
			ly.chunkE, ly.chunkK, ly.chunkV, ly.pendK, ly.pendV, ly.memK, ly.memV} {
			n += len(s)
		}
		n += len(ly.h)
	}
	return n
}

// MemoryLen returns how many eidetic memory entries layer i holds now (0 for
// layers without memory).
func (d *Decoder) MemoryLen(i int) int {
	if i < 0 || i >= len(d.layers) {
		return 0
	}
	return d.layers[i].memN
}

// Step consumes token at position Pos() and returns the V logits for the
// next token. The slice is owned by the decoder and overwritten by the next
// Step; copy it to keep it.
func (d *Decoder) Step(token int32) ([]float32, error) {
	c := d.cfg
	if token < 0 || int(token) >= c.VocabSize {
		return nil, fmt.Errorf("decoder: token %d at position %d is outside the vocabulary [0,%d)", token, d.t, c.VocabSize)
	}
	dm := c.DModel
	copy(d.x, d.embed[int(token)*dm:(int(token)+1)*dm])
	if d.ropeFreq != nil {
		for i, f := range d.ropeFreq {
			d.ropeSin[i], d.ropeCos[i] = math.Sincos(float64(d.t) * f)
		}
	}
	for i := range d.layers {
		ly := &d.layers[i]
		rmsNorm(d.u, d.x, ly.norm1)
		if ly.mixer != MixerAttention {
			d.ssmStep(ly)
		}
		if ly.mixer == MixerMamba {
			for j := range d.mid {
				d.mid[j] = d.x[j] + d.f[j]
			}
		} else {
			d.attnStep(ly)
			copy(d.mid, d.x)
			d.matVec(d.mid, ly.wo, d.o, true)
		}
		if c.HasMLP() {
			rmsNorm(d.u2, d.mid, ly.norm2)
			d.matVec(d.gate, ly.wGate, d.u2, false)
			d.matVec(d.up, ly.wUp, d.u2, false)
			for j, g := range d.gate {
				v := float64(g)
				d.hid[j] = float32(v * sigmoid(v) * float64(d.up[j]))
			}
			copy(d.x, d.mid)
			d.matVec(d.x, ly.wDown, d.hid, true)
		} else {
			copy(d.x, d.mid)
		}
	}
	rmsNorm(d.u, d.x, d.normF)
	d.matVec(d.logits, d.embed, d.u, false)
	d.t++
	return d.logits, nil
}

// ssmStep advances the layer's SSM by one position: d.u → d.f (docs/model.md §3).
func (d *Decoder) ssmStep(ly *decLayer) {
	c := d.cfg
	E, N, K, R := c.DInner, c.DState, c.DConv, c.DtRank
	d.matVec(d.aPre, ly.inProj[:E*c.DModel], d.u, false)
	d.matVec(d.z, ly.inProj[E*c.DModel:], d.u, false)
	// Causal depthwise conv over the K−1 stored inputs and the current one,
	// accumulated in float32 in the reference's order.
	for e := 0; e < E; e++ {
		s := ly.convB[e]
		for k := 0; k < K-1; k++ {
			s += ly.convW[e*K+k] * ly.conv[k*E+e]
		}
		s += ly.convW[e*K+K-1] * d.aPre[e]
		v := float64(s)
		d.a[e] = float32(v * sigmoid(v))
	}
	if K > 1 {
		copy(ly.conv, ly.conv[E:])
		copy(ly.conv[(K-2)*E:], d.aPre)
	}
	d.matVec(d.dlt, ly.xProj[:R*E], d.a, false)
	d.matVec(d.bm, ly.xProj[R*E:(R+N)*E], d.a, false)
	d.matVec(d.cm, ly.xProj[(R+N)*E:], d.a, false)
	d.matVec(d.dt, ly.dtW, d.dlt, false)
	for e := 0; e < E; e++ {
		xv := float64(d.a[e])
		delta := softplus(float64(d.dt[e]) + float64(ly.dtB[e]))
		dx := delta * xv
		h, A := ly.h[e*N:(e+1)*N], ly.negA[e*N:(e+1)*N]
		var y float64
		for n := range h {
			h[n] = math.Exp(delta*A[n])*h[n] + dx*float64(d.bm[n])
			y += h[n] * float64(d.cm[n])
		}
		y += float64(ly.dSkip[e]) * xv
		zv := float64(d.z[e])
		d.y[e] = float32(y * zv * sigmoid(zv))
	}
	d.matVec(d.f, ly.outPro, d.y, false)
}

// attnStep computes the concatenated head outputs d.o of position d.t
// (docs/model.md §4) and updates the layer's key/value and memory state.
func (d *Decoder) attnStep(ly *decLayer) {
	c := d.cfg
	t := d.t
	H, G, D := c.NHead, c.NKVHead, c.HeadDim
	GD := G * D
	Wc := c.Window
	bmojo := ly.mixer == MixerBMOJO
	fading := bmojo && c.FadingWindow > 0
	memory := bmojo && c.HasMemory()
	C := c.Chunk

	if memory && t%C == 0 && t/C >= c.MemoryDelay() && ly.pendN > 0 {
		// Chunk t/C−δ becomes visible from this chunk on.
		d.promote(ly)
	}

	d.matVec(d.q, ly.wq, d.u, false)
	d.matVec(d.k, ly.wk, d.u, false)
	d.matVec(d.v, ly.wv, d.u, false)
	d.rope(d.qr, d.q)
	d.rope(d.kr, d.k)
	slot := t % Wc
	copy(ly.ctxK[slot*GD:(slot+1)*GD], d.kr)
	copy(ly.ctxV[slot*GD:(slot+1)*GD], d.v)
	Wcf := Wc + c.FadingWindow
	if fading {
		d.matVec(d.kf, ly.wk, d.f, false)
		d.matVec(d.vf, ly.wv, d.f, false)
		fs := t % Wcf
		d.rope(ly.fadK[fs*GD:(fs+1)*GD], d.kf)
		copy(ly.fadV[fs*GD:(fs+1)*GD], d.vf)
	}
	memRaw := c.MemoryRope == "none"
	if memory {
		d.matVec(d.pred, ly.wp, ly.fPrev, false)
		var s float64
		for i, uv := range d.u {
			df := float64(uv) - float64(d.pred[i])
			s += df * df
		}
		i := t % C
		ly.chunkE[i] = float32(s / float64(c.DModel))
		mk := d.kr
		if memRaw {
			mk = d.k
		}
		copy(ly.chunkK[i*GD:(i+1)*GD], mk)
		copy(ly.chunkV[i*GD:(i+1)*GD], d.v)
		copy(ly.fPrev, d.f)
	}

	for h := 0; h < H; h++ {
		g := h * G / H
		qv := d.qr[h*D : (h+1)*D]
		n := 0
		add := func(q, k, v []float32) {
			d.scores[n] = dot64(q, k) * d.scale
			d.vals[n] = v
			n++
		}
		for j := max(0, t-Wc+1); j <= t; j++ {
			s := j % Wc
			add(qv, ly.ctxK[s*GD+g*D:s*GD+(g+1)*D], ly.ctxV[s*GD+g*D:s*GD+(g+1)*D])
		}
		if fading {
			for j := max(0, t-Wcf+1); j <= t-Wc; j++ {
				s := j % Wcf
				add(qv, ly.fadK[s*GD+g*D:s*GD+(g+1)*D], ly.fadV[s*GD+g*D:s*GD+(g+1)*D])
			}
		}
		if memory && ly.memN > 0 {
			qm := qv
			if memRaw {
				qm = d.q[h*D : (h+1)*D]
			}
			for i := 0; i < ly.memN; i++ {
				s := (ly.memHead + i) % c.Memory
				add(qm, ly.memK[s*GD+g*D:s*GD+(g+1)*D], ly.memV[s*GD+g*D:s*GD+(g+1)*D])
			}
		}
		mx := math.Inf(-1)
		for _, s := range d.scores[:n] {
			mx = max(mx, s)
		}
		clear(d.acc)
		var tot float64
		for i, s := range d.scores[:n] {
			w := math.Exp(s - mx)
			tot += w
			for j, x := range d.vals[i] {
				d.acc[j] += w * float64(x)
			}
		}
		or := d.o[h*D : (h+1)*D]
		for j, a := range d.acc {
			or[j] = float32(a / tot)
		}
	}

	if memory && (t+1)%C == 0 {
		d.selectChunk(ly, t+1-C)
	}
}

// selectChunk picks the k_sel positions of the just-completed chunk starting
// at t0 with the largest innovation (ties: the later position) and queues
// them until they become visible δ chunks later (docs/model.md §4).
func (d *Decoder) selectChunk(ly *decLayer, t0 int) {
	c := d.cfg
	S, GD := c.SelectPerChunk, c.NKVHead*c.HeadDim
	idx := d.order
	for i := range idx {
		idx[i] = i
	}
	e := ly.chunkE
	sort.Slice(idx, func(i, j int) bool {
		vi, vj := e[idx[i]], e[idx[j]]
		if vi != vj {
			return vi > vj
		}
		return idx[i] > idx[j]
	})
	top := idx[:S]
	sort.Ints(top)
	nChunks := len(ly.pendPos) / S
	slot := (ly.pendHead + ly.pendN) % nChunks
	for i, p := range top {
		r := slot*S + i
		ly.pendPos[r] = t0 + p
		copy(ly.pendK[r*GD:(r+1)*GD], ly.chunkK[p*GD:(p+1)*GD])
		copy(ly.pendV[r*GD:(r+1)*GD], ly.chunkV[p*GD:(p+1)*GD])
	}
	ly.pendN++
}

// promote moves the oldest pending chunk's selections into the memory,
// evicting the oldest entries beyond M (first in, first out).
func (d *Decoder) promote(ly *decLayer) {
	c := d.cfg
	S, GD, M := c.SelectPerChunk, c.NKVHead*c.HeadDim, c.Memory
	nChunks := len(ly.pendPos) / S
	for i := 0; i < S; i++ {
		r := ly.pendHead*S + i
		var s int
		if ly.memN < M {
			s = (ly.memHead + ly.memN) % M
			ly.memN++
		} else {
			s = ly.memHead
			ly.memHead = (ly.memHead + 1) % M
		}
		ly.memPos[s] = ly.pendPos[r]
		copy(ly.memK[s*GD:(s+1)*GD], ly.pendK[r*GD:(r+1)*GD])
		copy(ly.memV[s*GD:(s+1)*GD], ly.pendV[r*GD:(r+1)*GD])
	}
	ly.pendHead = (ly.pendHead + 1) % nChunks
	ly.pendN--
}

// rope rotates x (heads of width D) to position d.t into out.
func (d *Decoder) rope(out, x []float32) {
	D := d.cfg.HeadDim
	h := D / 2
	for base := 0; base+D <= len(x); base += D {
		xr, or := x[base:base+D], out[base:base+D]
		for i := 0; i < h; i++ {
			a, b := float64(xr[i]), float64(xr[i+h])
			cs, sn := d.ropeCos[i], d.ropeSin[i]
			or[i], or[i+h] = float32(a*cs-b*sn), float32(b*cs+a*sn)
		}
	}
}

// matVec sets out = W·x (W: len(out)×len(x), row-major), or out += W·x when
// accumulate, summing in float64.
func (d *Decoder) matVec(out, w, x []float32, accumulate bool) {
	n := len(x)
	xs := d.x64[:n]
	for i, v := range x {
		xs[i] = float64(v)
	}
	for r := range out {
		row := w[r*n : (r+1)*n]
		var s0, s1, s2, s3 float64
		i := 0
		for ; i+4 <= n; i += 4 {
			s0 += float64(row[i]) * xs[i]
			s1 += float64(row[i+1]) * xs[i+1]
			s2 += float64(row[i+2]) * xs[i+2]
			s3 += float64(row[i+3]) * xs[i+3]
		}
		for ; i < n; i++ {
			s0 += float64(row[i]) * xs[i]
		}
		s := (s0 + s1) + (s2 + s3)
		if accumulate {
			s += float64(out[r])
		}
		out[r] = float32(s)
	}
}

func dot64(a, b []float32) float64 {
	var s float64
	for i, x := range a {
		s += float64(x) * float64(b[i])
	}
	return s
}

// rmsNorm sets out = x / sqrt(mean(x²) + 1e-5) ⊙ g.
func rmsNorm(out, x, g []float32) {
	var ss float64
	for _, v := range x {
		ss += float64(v) * float64(v)
	}
	s := 1 / math.Sqrt(ss/float64(len(x))+1e-5)
	for i, v := range x {
		out[i] = float32(float64(v) * s * float64(g[i]))
	}
}

func sigmoid(x float64) float64 { return 1 / (1 + math.Exp(-x)) }

func softplus(x float64) float64 {
	if x > 20 {
		return x
	}
	return math.Log1p(math.Exp(x))
}

// Sample draws the next token from logits: temperature ≤ 0 (or NaN) takes
// the argmax (ties: the lowest id); otherwise it samples from
// softmax(logits/temperature) restricted to the topK largest logits (topK
// ≤ 0 or ≥ len(logits): all of them; ties at the cut keep the lowest ids).
// NaN logits are never chosen. A nil rng uses math/rand/v2's global source.
// It returns −1 only for empty logits.
func Sample(logits []float32, temperature float64, topK int, rng *rand.Rand) int32 {
	if len(logits) == 0 {
		return -1
	}
	best := -1
	for i, v := range logits {
		if v != v {
			continue
		}
		if best < 0 || v > logits[best] {
			best = i
		}
	}
	if best < 0 {
		return 0 // every logit is NaN: nothing to prefer
	}
	if !(temperature > 0) || math.IsInf(float64(logits[best]), 0) || topK == 1 {
		return int32(best)
	}
	idx := make([]int, 0, len(logits))
	for i, v := range logits {
		if v == v && !math.IsInf(float64(v), -1) {
			idx = append(idx, i)
		}
	}
	if topK > 0 && topK < len(idx) {
		sort.SliceStable(idx, func(i, j int) bool { return logits[idx[i]] > logits[idx[j]] })
		idx = idx[:topK]
	}
	mx := float64(logits[best])
	w := make([]float64, len(idx))
	var tot float64
	for i, j := range idx {
		w[i] = math.Exp((float64(logits[j]) - mx) / temperature)
		tot += w[i]
	}
	var r float64
	if rng != nil {
		r = rng.Float64() * tot
	} else {
		r = rand.Float64() * tot
	}
	for i, j := range idx {
		r -= w[i]
		if r < 0 {
			return int32(j)
		}
	}
	// Rounding left r ≥ 0 after the last weight: take the last positive one.
	for i := len(idx) - 1; i >= 0; i-- {
		if w[i] > 0 {
			return int32(idx[i])
		}
	}
	return int32(best)
}
