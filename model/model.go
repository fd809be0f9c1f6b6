package model

import (
	"fmt"
	"math"
	"slices"

	"github.com/bmojo/bmojo/kernels"
)

// Model is one replica of the network on one backend: parameters, gradients
// and the activations of one batch shape (B sequences of T tokens). It is not
// safe for concurrent use.
type Model[F kernels.Float] struct {
	Cfg    Config
	Layout *Layout
	be     kernels.Backend[F]

	Params kernels.Buffer // flat, Layout order
	Grads  kernels.Buffer // flat, same order; Backward accumulates here

	p, g map[string]kernels.Buffer // per-tensor views of Params and Grads
	// gu, dgu are, per layer with an MLP, W_gate and W_up (neighbours in
	// the layout) as one [2F,d] view of Params and of Grads: the two
	// products are one (SwiGLUPacked).
	gu, dgu []kernels.Buffer
	B, T    int
	acts    *activations[F]
	nLabel  int // labelled positions of the last Forward

	// LabelledHead makes Forward compute the output head (the product
	// with the embedding, the cross-entropy and their backward) only at
	// the labelled positions, when they are at most half of the batch:
	// the loss and every gradient are the same, at a fraction of the
	// cost for sparse targets (MQAR labels K of T positions). Logits then
	// holds zeros at the unlabelled positions; LabelledLogits returns the
	// computed rows alone.
	LabelledHead bool
	head         *headRows // the rows of the last Forward's head, nil for all

	// KeepShapes is how many batch shapes' activations Prepare keeps
	// (the most recent; 0 or 1: only the current one), so that a model
	// alternating between shapes (one batch per MQAR setting) does not
	// reallocate. Each kept shape holds its activations' device memory.
	KeepShapes int
	prepared   []*activations[F]
}

// headRows is the labelled head of one Forward: the R = len(pos) rows it
// computed (the labelled positions, padded to a multiple of headPad with
// ignored rows) and, per R, the device index buffers.
type headRows struct {
	pos      []int             // labelled positions, ascending (len n ≤ R)
	R        int               // rows computed
	idx, tgt kernels.IntBuffer // [R] positions gathered and their targets
}

// headPad is the row multiple of a labelled head: few distinct shapes,
// so each product shape is tuned once.
const headPad = 256

// New builds a model with parameters from InitParams(seed).
func New[F kernels.Float](be kernels.Backend[F], c Config, seed uint64) (*Model[F], error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	l := NewLayout(c)
	m := &Model[F]{Cfg: c, Layout: l, be: be}
	m.Params = be.Alloc(l.Total)
	m.Grads = be.Alloc(l.Total)
	m.p, m.g = map[string]kernels.Buffer{}, map[string]kernels.Buffer{}
	for _, t := range l.Tensors {
		m.p[t.Name] = be.Slice(m.Params, t.Offset, t.Size())
		m.g[t.Name] = be.Slice(m.Grads, t.Offset, t.Size())
	}
	if c.HasMLP() {
		for i := range c.Mixers {
			off, n := l.stacked(fmt.Sprintf("layers.%d.mlp.gate_proj.weight", i), fmt.Sprintf("layers.%d.mlp.up_proj.weight", i))
			m.gu = append(m.gu, be.Slice(m.Params, off, n))
			m.dgu = append(m.dgu, be.Slice(m.Grads, off, n))
		}
	}
	if err := m.SetParams(InitParams(c, l, seed)); err != nil {
		return nil, err
	}
	return m, be.Err()
}

// Backend returns the backend the model runs on.
func (m *Model[F]) Backend() kernels.Backend[F] { return m.be }

// SetParams uploads a flat float64 parameter vector in Layout order.
func (m *Model[F]) SetParams(v []float64) error {
	if len(v) != m.Layout.Total {
		return fmt.Errorf("model: %d parameters given, layout has %d", len(v), m.Layout.Total)
	}
	h := make([]F, len(v))
	for i, x := range v {
		h[i] = F(x)
	}
	m.be.Upload(m.Params, h)
	return m.be.Err()
}

// ParamsHost downloads the parameters as float64 in Layout order.
func (m *Model[F]) ParamsHost() []float64 { return m.download(m.Params) }

// GradsHost downloads the gradients as float64 in Layout order.
func (m *Model[F]) GradsHost() []float64 { return m.download(m.Grads) }

func (m *Model[F]) download(b kernels.Buffer) []float64 {
	h := make([]F, b.Len())
	m.be.Download(h, b)
	out := make([]float64, len(h))
	for i, x := range h {
		out[i] = float64(x)
	}
	return out
}

// ParamsF32 downloads the parameters as float32 in Layout order, the
// precision checkpoints store: for a float32 model an exact copy, 4 bytes
// per parameter of host memory.
func (m *Model[F]) ParamsF32() []float32 { return downloadF32(m.be, m.Params) }

// SetParamsF32 uploads a flat float32 parameter vector in Layout order (as a
// checkpoint holds it).
func (m *Model[F]) SetParamsF32(v []float32) error {
	if len(v) != m.Layout.Total {
		return fmt.Errorf("model: %d parameters given, layout has %d", len(v), m.Layout.Total)
	}
	m.be.Upload(m.Params, fromF32[F](v))
	return m.be.Err()
}

// downloadF32 copies b to the host as float32.
func downloadF32[F kernels.Float](be kernels.Backend[F], b kernels.Buffer) []float32 {
	h := make([]F, b.Len())
	be.Download(h, b)
	if v, ok := any(h).([]float32); ok {
		return v
	}
	out := make([]float32, len(h))
	for i, x := range h {
		out[i] = float32(x)
	}
	return out
}

// fromF32 returns v as []F: v itself for F = float32 (Upload copies it).
func fromF32[F kernels.Float](v []float32) []F {
	if h, ok := any(v).([]F); ok {
		return h
	}
	h := make([]F, len(v))
	for i, x := range v {
		h[i] = F(x)
	}
	return h
}

// Param returns the view of parameter tensor name (nil if absent).
func (m *Model[F]) Param(name string) kernels.Buffer { return m.p[name] }

// Grad returns the view of the gradient of tensor name (nil if absent).
func (m *Model[F]) Grad(name string) kernels.Buffer { return m.g[name] }

// layerActs holds what one layer's backward needs from its forward.
type layerActs struct {
	res, rstd1, u kernels.Buffer // input residual [BT,d], its norm stats, normed input u
	// SSM
	aPre, z, aConv, a, dlt, bm, cm, dt, y, f kernels.Buffer
	// attention
	q, k, v, qr, kr, kfRaw, kfr, vf, o, lse kernels.Buffer
	// With fading keys, W_k and W_v apply to u and to f: u, f are the two
	// halves of uf [2BT,d] (and k, kfRaw of kk; v, vf of vv), so each is
	// one product over 2BT rows.
	uf, kk, vv       kernels.Buffer
	pin, pred, innov kernels.Buffer
	sel              kernels.IntBuffer
	// MLP: gu is gate|up, [BT,2F] (one product with W_gate, W_up stacked)
	mid, rstd2, u2, gu, h kernels.Buffer
}

type activations[F kernels.Float] struct {
	B, T             int
	xsel, dxsel      kernels.Buffer    // [BT,d]: a labelled head's gathered rows and their gradient (first R rows used; allocated at its first use)
	heads            map[int]*headRows // labelled heads by R
	tokens, targets  kernels.IntBuffer
	layers           []layerActs
	resOut           kernels.Buffer // residual after the last layer
	rstdF, xf        kernels.Buffer
	logits, losses   kernels.Buffer
	dres, du         kernels.Buffer // [BT,d] gradients
	dudf, dkk, dvv   kernels.Buffer // du|df, dk|dkf, dv|dvf (layerActs.uf)
	dkrr             kernels.Buffer // dkr|dkfr
	dlogits, dxf     kernels.Buffer
	dq, dk, dv, dqr  kernels.Buffer
	dkr, dkf, dkfr   kernels.Buffer
	dvf, do, dpred   kernels.Buffer
	df, dy, da, dz   kernels.Buffer
	daConv, daPre    kernels.Buffer
	ddt, ddlt, dbm   kernels.Buffer
	dcm, dgu, dh     kernels.Buffer // dgu: dgate|dup [BT,2F]
	dinnov           kernels.Buffer
	xdbl, dxdbl      kernels.Buffer // x_proj's output [BT, R+2N] and its gradient
	hostLoss, hostIn []F
}

// Prepare allocates activations for batches of B sequences of T tokens. T may
// differ from the training length (evaluation at other lengths); a trailing
// incomplete chunk selects nothing (docs/model.md §4).
func (m *Model[F]) Prepare(B, T int) error {
	if B == m.B && T == m.T && m.acts != nil {
		return nil
	}
	c := m.Cfg
	if B <= 0 || T <= 0 {
		return fmt.Errorf("model: batch %d × length %d must be positive", B, T)
	}
	for _, a := range m.prepared {
		if a.B == B && a.T == T {
			m.B, m.T, m.acts, m.head = B, T, a, nil
			return nil
		}
	}
	be := m.be
	BT, d, E, N, R := B*T, c.DModel, c.DInner, c.DState, c.DtRank
	H, G, D := c.NHead, c.NKVHead, c.HeadDim
	a := &activations[F]{}
	a.tokens, a.targets = be.AllocInt(BT), be.AllocInt(BT)
	// halves returns a buffer of 2n and views of its two halves.
	halves := func(n int) (kernels.Buffer, kernels.Buffer, kernels.Buffer) {
		x := be.Alloc(2 * n)
		return x, be.Slice(x, 0, n), be.Slice(x, n, n)
	}
	for _, mx := range c.Mixers {
		var la layerActs
		stack := m.layerShape(mx).Wf > 0 // fading keys: W_k, W_v apply to u|f
		la.res, la.rstd1 = be.Alloc(BT*d), be.Alloc(BT)
		if stack {
			la.uf, la.u, la.f = halves(BT * d)
		} else {
			la.u = be.Alloc(BT * d)
		}
		if mx != MixerAttention {
			la.aPre, la.z, la.aConv, la.a = be.Alloc(BT*E), be.Alloc(BT*E), be.Alloc(BT*E), be.Alloc(BT*E)
			la.dlt, la.bm, la.cm = be.Alloc(BT*R), be.Alloc(BT*N), be.Alloc(BT*N)
			la.dt, la.y = be.Alloc(BT*E), be.Alloc(BT*E)
			if !stack {
				la.f = be.Alloc(BT * d)
			}
		}
		if mx != MixerMamba {
			la.q, la.qr = be.Alloc(BT*H*D), be.Alloc(BT*H*D)
			la.o, la.lse = be.Alloc(BT*H*D), be.Alloc(BT*H)
			if stack {
				la.kk, la.k, la.kfRaw = halves(BT * G * D)
				la.vv, la.v, la.vf = halves(BT * G * D)
				la.kr, la.kfr = be.Alloc(BT*G*D), be.Alloc(BT*G*D)
			} else {
				la.k, la.v, la.kr = be.Alloc(BT*G*D), be.Alloc(BT*G*D), be.Alloc(BT*G*D)
			}
			if mx == MixerBMOJO && c.HasMemory() {
				la.pin, la.pred, la.innov = be.Alloc(BT*d), be.Alloc(BT*d), be.Alloc(BT)
				la.sel = be.AllocInt(B * (T / c.Chunk) * c.SelectPerChunk)
			}
		}
		if c.HasMLP() {
			la.mid, la.rstd2, la.u2 = be.Alloc(BT*d), be.Alloc(BT), be.Alloc(BT*d)
			la.gu, la.h = be.Alloc(2*BT*c.DFF), be.Alloc(BT*c.DFF)
		}
		a.layers = append(a.layers, la)
	}
	a.resOut, a.rstdF, a.xf = be.Alloc(BT*d), be.Alloc(BT), be.Alloc(BT*d)
	a.logits, a.losses = be.Alloc(BT*c.VocabSize), be.Alloc(BT)
	a.dres = be.Alloc(BT * d)
	a.dudf, a.du, a.df = halves(BT * d)
	a.dlogits, a.dxf = be.Alloc(BT*c.VocabSize), be.Alloc(BT*d)
	a.dkk, a.dk, a.dkf = halves(BT * G * D)
	a.dvv, a.dv, a.dvf = halves(BT * G * D)
	a.dkrr, a.dkr, a.dkfr = halves(BT * G * D)
	a.dq, a.dqr = be.Alloc(BT*H*D), be.Alloc(BT*H*D)
	a.do, a.dpred = be.Alloc(BT*H*D), be.Alloc(BT*d)
	a.dy, a.da, a.dz = be.Alloc(BT*E), be.Alloc(BT*E), be.Alloc(BT*E)
	a.daConv, a.daPre = be.Alloc(BT*E), be.Alloc(BT*E)
	a.ddt, a.ddlt, a.dbm, a.dcm = be.Alloc(BT*E), be.Alloc(BT*R), be.Alloc(BT*N), be.Alloc(BT*N)
	a.xdbl, a.dxdbl = be.Alloc(BT*(R+2*N)), be.Alloc(BT*(R+2*N))
	a.dgu, a.dh = be.Alloc(2*BT*c.DFF), be.Alloc(BT*c.DFF)
	a.dinnov = be.Alloc(BT)
	a.hostLoss, a.hostIn = make([]F, BT), make([]F, BT)
	for i := range a.hostIn {
		a.hostIn[i] = F(c.InnovationLoss / float64(BT))
	}
	be.Upload(a.dinnov, a.hostIn)
	a.B, a.T = B, T
	a.heads = map[int]*headRows{}
	m.prepared = append(m.prepared, a)
	if n := max(1, m.KeepShapes); len(m.prepared) > n {
		m.prepared = slices.Delete(m.prepared, 0, len(m.prepared)-n)
	}
	m.B, m.T, m.acts, m.head = B, T, a, nil
	return be.Err()
}

func (m *Model[F]) attnShape() kernels.AttnShape {
	c := m.Cfg
	s := kernels.AttnShape{B: m.B, T: m.T, H: c.NHead, G: c.NKVHead, D: c.HeadDim, Wc: c.Window}
	return s
}

// layerShape specialises the attention shape to one mixer.
func (m *Model[F]) layerShape(mixer string) kernels.AttnShape {
	c := m.Cfg
	s := m.attnShape()
	if mixer == MixerBMOJO {
		s.Wf = c.FadingWindow
		if c.HasMemory() {
			s.C, s.S, s.M, s.Delta = c.Chunk, c.SelectPerChunk, c.Memory, c.MemoryDelay()
		}
	}
	return s
}

// Loss is the result of one forward pass.
type Loss struct {
	CE       float64 // mean cross-entropy over labelled positions
	Aux      float64 // Σ_l innovation loss (unweighted)
	Total    float64 // CE + λ·Aux, the optimised objective
	Labelled int     // labelled positions in the batch
}

// Forward runs the network on tokens [B·T] with next-token targets [B·T]
// (negative = ignored) and returns the loss. Activations are kept for
// Backward.
func (m *Model[F]) Forward(tokens, targets []int32) (Loss, error) {
	if m.acts == nil {
		return Loss{}, fmt.Errorf("model: Forward before Prepare")
	}
	BT := m.B * m.T
	if len(tokens) != BT || len(targets) != BT {
		return Loss{}, fmt.Errorf("model: got %d tokens and %d targets, want B·T = %d", len(tokens), len(targets), BT)
	}
	V := int32(m.Cfg.VocabSize)
	n := 0
	for i, t := range tokens {
		if t < 0 || t >= V {
			return Loss{}, fmt.Errorf("model: token %d at position %d is outside the vocabulary [0,%d)", t, i, V)
		}
		if targets[i] >= V {
			return Loss{}, fmt.Errorf("model: target %d at position %d is outside the vocabulary [0,%d)", targets[i], i, V)
		}
		if targets[i] >= 0 {
			n++
		}
	}
	a, be := m.acts, m.be
	be.UploadInt(a.tokens, tokens)
	be.UploadInt(a.targets, targets)
	m.nLabel = n
	m.head = nil
	if m.LabelledHead && n > 0 && 2*n <= BT {
		m.head = m.labelledRows(targets, n)
	}
	m.forwardLogits()
	hostLoss := a.hostLoss
	if h := m.head; h != nil {
		V := m.Cfg.VocabSize
		be.CrossEntropy(be.Slice(a.losses, 0, h.R), be.Slice(a.logits, 0, h.R*V), h.tgt, h.R, V)
		hostLoss = hostLoss[:h.R]
		be.Download(hostLoss, be.Slice(a.losses, 0, h.R))
	} else {
		be.CrossEntropy(a.losses, a.logits, a.targets, BT, m.Cfg.VocabSize)
		be.Download(hostLoss, a.losses)
	}
	if err := be.Err(); err != nil {
		return Loss{}, err
	}
	var l Loss
	l.Labelled = n
	if n > 0 {
		var s float64
		for _, x := range hostLoss {
			s += float64(x)
		}
		l.CE = s / float64(n)
	}
	for i, mx := range m.Cfg.Mixers {
		if mx == MixerBMOJO && m.Cfg.HasMemory() {
			be.Download(a.hostIn, a.layers[i].innov)
			var s float64
			for _, x := range a.hostIn {
				s += float64(x)
			}
			l.Aux += s / float64(BT)
		}
	}
	l.Total = l.CE + m.Cfg.InnovationLoss*l.Aux
	return l, be.Err()
}

// Logits returns the logits [B·T, V] of the last Forward (or ForwardLogits).
// After a Forward with a labelled head (LabelledHead), the rows at the
// unlabelled positions are 0.
func (m *Model[F]) Logits() []F {
	out := make([]F, m.acts.logits.Len())
	if m.head != nil {
		V := m.Cfg.VocabSize
		rows, pos := m.LabelledLogits()
		for i, p := range pos {
			copy(out[p*V:(p+1)*V], rows[i*V:(i+1)*V])
		}
		return out
	}
	m.be.Download(out, m.acts.logits)
	return out
}

// LabelledLogits returns the logits of the last Forward's labelled
// positions, [len(pos), V] in position order, and the positions, reading
// back only those rows after a Forward with a labelled head.
func (m *Model[F]) LabelledLogits() (logits []F, pos []int) {
	V := m.Cfg.VocabSize
	if h := m.head; h != nil {
		rows := make([]F, h.R*V)
		m.be.Download(rows, m.be.Slice(m.acts.logits, 0, h.R*V))
		return rows[:len(h.pos)*V], slices.Clone(h.pos)
	}
	all := m.Logits()
	tg := make([]int32, m.B*m.T)
	m.be.DownloadInt(tg, m.acts.targets)
	for p, y := range tg {
		if y >= 0 {
			pos = append(pos, p)
			logits = append(logits, all[p*V:(p+1)*V]...)
		}
	}
	return logits, pos
}

// labelledRows uploads the gather indices and targets of a labelled head:
// the n labelled positions of targets, then ignored rows (position 0,
// target −1) up to a multiple of headPad.
func (m *Model[F]) labelledRows(targets []int32, n int) *headRows {
	a, BT := m.acts, m.B*m.T
	if a.xsel == nil { // only models with a labelled head need them
		a.xsel, a.dxsel = m.be.Alloc(BT*m.Cfg.DModel), m.be.Alloc(BT*m.Cfg.DModel)
	}
	R := min(BT, (n+headPad-1)/headPad*headPad)
	h := a.heads[R]
	if h == nil {
		h = &headRows{R: R, idx: m.be.AllocInt(R), tgt: m.be.AllocInt(R)}
		a.heads[R] = h
	}
	h.pos = h.pos[:0]
	idx, tgt := make([]int32, R), make([]int32, R)
	for p, y := range targets {
		if y >= 0 {
			idx[len(h.pos)], tgt[len(h.pos)] = int32(p), y
			h.pos = append(h.pos, p)
		}
	}
	for i := n; i < R; i++ {
		tgt[i] = -1
	}
	m.be.UploadInt(h.idx, idx)
	m.be.UploadInt(h.tgt, tgt)
	return h
}

// ForwardLogits runs the network on tokens [B·T] without a loss.
func (m *Model[F]) ForwardLogits(tokens []int32) error {
	if m.acts == nil {
		return fmt.Errorf("model: ForwardLogits before Prepare")
	}
	if len(tokens) != m.B*m.T {
		return fmt.Errorf("model: got %d tokens, want B·T = %d", len(tokens), m.B*m.T)
	}
	for i, t := range tokens {
		if t < 0 || int(t) >= m.Cfg.VocabSize {
			return fmt.Errorf("model: token %d at position %d is outside the vocabulary [0,%d)", t, i, m.Cfg.VocabSize)
		}
	}
	m.be.UploadInt(m.acts.tokens, tokens)
	m.head = nil
	m.forwardLogits()
	return m.be.Err()
}

func (m *Model[F]) forwardLogits() {
	c, a, be := m.Cfg, m.acts, m.be
	B, T := m.B, m.T
	BT, d := B*T, c.DModel
	be.Embedding(a.layers0Res(), m.p["embed.weight"], a.tokens, BT, d)
	for i, mx := range c.Mixers {
		la := &a.layers[i]
		pre := fmt.Sprintf("layers.%d.", i)
		P := func(n string) kernels.Buffer { return m.p[pre+n] }
		be.RMSNorm(la.u, la.rstd1, la.res, P("norm1.weight"), BT, d)
		// mixer output goes to next: the residual after the mixer.
		next := a.resOut
		if i+1 < len(a.layers) {
			next = a.layers[i+1].res
		}
		mid := next
		if c.HasMLP() {
			mid = la.mid
		}
		if mx != MixerAttention {
			m.ssmForward(la, P, B, T)
		}
		switch mx {
		case MixerMamba:
			be.Copy(mid, la.res)
			be.Accumulate(mid, la.f)
		default:
			m.attnForward(la, P, mx)
			be.MatMulAdd(mid, la.res, la.o, P("attn.o_proj.weight"), BT, d, c.NHead*c.HeadDim)
		}
		if c.HasMLP() {
			be.RMSNorm(la.u2, la.rstd2, mid, P("norm2.weight"), BT, d)
			be.MatMul(la.gu, la.u2, m.gu[i], BT, 2*c.DFF, d, false)
			be.SwiGLUPacked(la.h, la.gu, BT, c.DFF)
			be.MatMulAdd(next, mid, la.h, P("mlp.down_proj.weight"), BT, d, c.DFF)
		}
	}
	be.RMSNorm(a.xf, a.rstdF, a.resOut, m.p["norm_f.weight"], BT, d)
	if h := m.head; h != nil {
		xs := be.Slice(a.xsel, 0, h.R*d)
		be.Embedding(xs, a.xf, h.idx, h.R, d) // gathers the labelled rows
		be.MatMul(be.Slice(a.logits, 0, h.R*c.VocabSize), xs, m.p["embed.weight"], h.R, c.VocabSize, d, false)
		return
	}
	be.MatMul(a.logits, a.xf, m.p["embed.weight"], BT, c.VocabSize, d, false)
}

func (a *activations[F]) layers0Res() kernels.Buffer {
	if len(a.layers) == 0 {
		return a.resOut
	}
	return a.layers[0].res
}

// ssmForward computes the fading-memory path f = SSM(u) (docs/model.md §3).
func (m *Model[F]) ssmForward(la *layerActs, P func(string) kernels.Buffer, B, T int) {
	c, be := m.Cfg, m.be
	BT, d, E, N, R, K := B*T, c.DModel, c.DInner, c.DState, c.DtRank, c.DConv
	win := P("ssm.in_proj.weight")
	be.MatMul(la.aPre, la.u, be.Slice(win, 0, E*d), BT, E, d, false)
	be.MatMul(la.z, la.u, be.Slice(win, E*d, E*d), BT, E, d, false)
	be.Conv1dSiLU(la.aConv, la.a, la.aPre, P("ssm.conv.weight"), P("ssm.conv.bias"), B, T, E, K)
	// x_proj is one product; its columns (Δ's low rank, B, C) are split
	// for the ops that read them.
	xd := m.acts.xdbl
	be.MatMul(xd, la.a, P("ssm.x_proj.weight"), BT, R+2*N, E, false)
	be.CopyColumns(la.dlt, xd, BT, R, R, 0, R+2*N, 0)
	be.CopyColumns(la.bm, xd, BT, N, N, 0, R+2*N, R)
	be.CopyColumns(la.cm, xd, BT, N, N, 0, R+2*N, R+N)
	be.MatMul(la.dt, la.dlt, P("ssm.dt_proj.weight"), BT, E, R, false)
	be.SelectiveScan(la.y, la.a, la.dt, P("ssm.dt_proj.bias"), P("ssm.A_log"), la.bm, la.cm, P("ssm.D"), la.z, B, T, E, N)
	be.MatMul(la.f, la.y, P("ssm.out_proj.weight"), BT, d, E, false)
}

// attnForward computes the concatenated head outputs o (docs/model.md §4).
func (m *Model[F]) attnForward(la *layerActs, P func(string) kernels.Buffer, mx string) {
	c, be := m.Cfg, m.be
	B, T := m.B, m.T
	BT, d, H, G, D := B*T, c.DModel, c.NHead, c.NKVHead, c.HeadDim
	wk, wv := P("attn.k_proj.weight"), P("attn.v_proj.weight")
	be.MatMul(la.q, la.u, P("attn.q_proj.weight"), BT, H*D, d, false)
	be.RoPE(la.qr, la.q, B, T, H, D, c.RopeTheta)
	s := m.layerShape(mx)
	if s.Wf > 0 { // k|kf = u|f · W_kᵀ, v|vf likewise (layerActs.uf)
		be.MatMul(la.kk, la.uf, wk, 2*BT, G*D, d, false)
		be.MatMul(la.vv, la.uf, wv, 2*BT, G*D, d, false)
		// Two calls: the attention reads kr and kfr as two operands, whose
		// bf16 copies the GPU backend has each RoPE write beside its output.
		be.RoPE(la.kr, la.k, B, T, G, D, c.RopeTheta)
		be.RoPE(la.kfr, la.kfRaw, B, T, G, D, c.RopeTheta)
	} else {
		be.MatMul(la.k, la.u, wk, BT, G*D, d, false)
		be.MatMul(la.v, la.u, wv, BT, G*D, d, false)
		be.RoPE(la.kr, la.k, B, T, G, D, c.RopeTheta)
	}
	var qm, km kernels.Buffer
	if s.M > 0 {
		be.ShiftRows(la.pin, la.f, B, T, d)
		be.MatMul(la.pred, la.pin, P("attn.predictor.weight"), BT, d, d, false)
		be.Innovation(la.innov, la.u, la.pred, BT, d)
		be.SelectChunks(la.sel, la.innov, B, T, c.Chunk, c.SelectPerChunk)
		qm, km = la.qr, la.kr
		if c.MemoryRope == "none" {
			qm, km = la.q, la.k
		}
	}
	be.Attention(la.o, la.lse, la.qr, la.kr, la.v, la.kfr, la.vf, qm, km, la.sel, s)
}

// Backward accumulates into Grads the gradient of the last Forward's Total
// loss. Call ZeroGrads first unless accumulating micro-batches.
func (m *Model[F]) Backward() error {
	return m.BackwardHook(nil)
}

// BackwardHook is Backward with a callback after each layer's parameter
// gradients are final (layers in reverse order, then -1 for the embedding
// and final norm), so a caller can start all-reducing them early.
func (m *Model[F]) BackwardHook(done func(layer int)) error {
	if m.acts == nil {
		return fmt.Errorf("model: Backward before Forward")
	}
	c, a, be := m.Cfg, m.acts, m.be
	B, T := m.B, m.T
	BT, d := B*T, c.DModel
	if h := m.head; h != nil {
		V := c.VocabSize
		dl, lg := be.Slice(a.dlogits, 0, h.R*V), be.Slice(a.logits, 0, h.R*V)
		xs, dxs := be.Slice(a.xsel, 0, h.R*d), be.Slice(a.dxsel, 0, h.R*d)
		be.Zero(dl)
		be.CrossEntropyBackward(dl, lg, h.tgt, 1/float64(m.nLabel), h.R, V)
		be.Zero(dxs)
		be.MatMulBackward(dxs, m.g["embed.weight"], dl, xs, m.p["embed.weight"], h.R, V, d)
		be.Zero(a.dxf)
		be.EmbeddingBackward(a.dxf, dxs, h.idx, h.R, d) // scatters them back
	} else {
		be.Zero(a.dlogits)
		if m.nLabel > 0 {
			be.CrossEntropyBackward(a.dlogits, a.logits, a.targets, 1/float64(m.nLabel), BT, c.VocabSize)
		}
		be.Zero(a.dxf)
		be.MatMulBackward(a.dxf, m.g["embed.weight"], a.dlogits, a.xf, m.p["embed.weight"], BT, c.VocabSize, d)
	}
	be.Zero(a.dres)
	be.RMSNormBackward(a.dres, m.g["norm_f.weight"], a.dxf, a.resOut, m.p["norm_f.weight"], a.rstdF, BT, d)
	for i := len(c.Mixers) - 1; i >= 0; i-- {
		mx := c.Mixers[i]
		la := &a.layers[i]
		pre := fmt.Sprintf("layers.%d.", i)
		P := func(n string) kernels.Buffer { return m.p[pre+n] }
		Gr := func(n string) kernels.Buffer { return m.g[pre+n] }
		if c.HasMLP() {
			be.Zero(a.dh)
			be.MatMulBackward(a.dh, Gr("mlp.down_proj.weight"), a.dres, la.h, P("mlp.down_proj.weight"), BT, d, c.DFF)
			be.Zero(a.dgu)
			be.SwiGLUPackedBackward(a.dgu, a.dh, la.gu, BT, c.DFF)
			be.Zero(a.du)
			be.MatMulBackward(a.du, m.dgu[i], a.dgu, la.u2, m.gu[i], BT, 2*c.DFF, d)
			be.RMSNormBackward(a.dres, Gr("norm2.weight"), a.du, la.mid, P("norm2.weight"), la.rstd2, BT, d)
		}
		// a.dres is now the gradient of the residual after the mixer.
		if m.layerShape(mx).Wf > 0 {
			be.Zero(a.dudf) // one range: the stacked k, v products write both
		} else {
			be.Zero(a.du)
			be.Zero(a.df)
		}
		if mx == MixerMamba {
			be.Accumulate(a.df, a.dres)
		} else {
			m.attnBackward(la, P, Gr, mx)
		}
		if mx != MixerAttention {
			m.ssmBackward(la, P, Gr)
		}
		be.RMSNormBackward(a.dres, Gr("norm1.weight"), a.du, la.res, P("norm1.weight"), la.rstd1, BT, d)
		if done != nil {
			done(i)
		}
	}
	be.EmbeddingBackward(m.g["embed.weight"], a.dres, a.tokens, BT, d)
	if done != nil {
		done(-1)
	}
	return be.Err()
}

// attnBackward takes a.dres (gradient of the mixer output) and accumulates
// into a.du (gradient of the normed input) and a.df (gradient of the SSM
// output, through the fading keys).
func (m *Model[F]) attnBackward(la *layerActs, P, Gr func(string) kernels.Buffer, mx string) {
	c, a, be := m.Cfg, m.acts, m.be
	B, T := m.B, m.T
	BT, d, H, G, D := B*T, c.DModel, c.NHead, c.NKVHead, c.HeadDim
	s := m.layerShape(mx)
	be.Zero(a.do)
	be.MatMulBackward(a.do, Gr("attn.o_proj.weight"), a.dres, la.o, P("attn.o_proj.weight"), BT, d, H*D)
	zero := []kernels.Buffer{a.dq, a.dqr, a.dkr, a.dv}
	if s.Wf > 0 {
		// dk|dkf, RoPEBackward's stacked output, is one range.
		zero = append(zero, a.dkk, a.dkfr, a.dvf)
	} else {
		zero = append(zero, a.dk)
	}
	for _, b := range zero {
		be.Zero(b)
	}
	var qm, km, dqm, dkm, kfr, vf, dkfr, dvf kernels.Buffer
	if s.M > 0 {
		qm, km, dqm, dkm = la.qr, la.kr, a.dqr, a.dkr
		if c.MemoryRope == "none" {
			qm, km, dqm, dkm = la.q, la.k, a.dq, a.dk
		}
	}
	if s.Wf > 0 {
		kfr, vf, dkfr, dvf = la.kfr, la.vf, a.dkfr, a.dvf
	}
	be.AttentionBackward(a.dqr, a.dkr, a.dv, dkfr, dvf, dqm, dkm, a.do, la.o, la.lse,
		la.qr, la.kr, la.v, kfr, vf, qm, km, la.sel, s)
	be.RoPEBackward(a.dq, a.dqr, B, T, H, D, c.RopeTheta)
	wq, wk, wv := P("attn.q_proj.weight"), P("attn.k_proj.weight"), P("attn.v_proj.weight")
	if s.Wf > 0 { // du|df from dk|dkf and dv|dvf, as in attnForward
		be.RoPEBackward(a.dkk, a.dkrr, 2*B, T, G, D, c.RopeTheta)
		be.MatMulBackward(a.dudf, Gr("attn.k_proj.weight"), a.dkk, la.uf, wk, 2*BT, G*D, d)
		be.MatMulBackward(a.dudf, Gr("attn.v_proj.weight"), a.dvv, la.uf, wv, 2*BT, G*D, d)
	} else {
		be.RoPEBackward(a.dk, a.dkr, B, T, G, D, c.RopeTheta)
		be.MatMulBackward(a.du, Gr("attn.k_proj.weight"), a.dk, la.u, wk, BT, G*D, d)
		be.MatMulBackward(a.du, Gr("attn.v_proj.weight"), a.dv, la.u, wv, BT, G*D, d)
	}
	be.MatMulBackward(a.du, Gr("attn.q_proj.weight"), a.dq, la.u, wq, BT, H*D, d)
	if s.M > 0 && c.InnovationLoss > 0 {
		// a.dinnov holds λ/BT: aux = mean_r e_r trains the predictor only.
		be.Zero(a.dpred)
		be.InnovationBackward(a.dpred, a.dinnov, la.u, la.pred, BT, d)
		be.MatMulBackward(nil, Gr("attn.predictor.weight"), a.dpred, la.pin, P("attn.predictor.weight"), BT, d, d)
	}
}

// ssmBackward takes a.df and accumulates into a.du.
func (m *Model[F]) ssmBackward(la *layerActs, P, Gr func(string) kernels.Buffer) {
	c, a, be := m.Cfg, m.acts, m.be
	B, T := m.B, m.T
	BT, d, E, N, R, K := B*T, c.DModel, c.DInner, c.DState, c.DtRank, c.DConv
	for _, b := range []kernels.Buffer{a.dy, a.da, a.dz, a.ddt, a.ddlt, a.dbm, a.dcm, a.daConv, a.daPre} {
		be.Zero(b)
	}
	be.MatMulBackward(a.dy, Gr("ssm.out_proj.weight"), a.df, la.y, P("ssm.out_proj.weight"), BT, d, E)
	be.SelectiveScanBackward(a.da, a.ddt, Gr("ssm.dt_proj.bias"), Gr("ssm.A_log"), a.dbm, a.dcm, Gr("ssm.D"), a.dz, a.dy,
		la.a, la.dt, P("ssm.dt_proj.bias"), P("ssm.A_log"), la.bm, la.cm, P("ssm.D"), la.z, B, T, E, N)
	be.MatMulBackward(a.ddlt, Gr("ssm.dt_proj.weight"), a.ddt, la.dlt, P("ssm.dt_proj.weight"), BT, E, R)
	// The three gradients join into x_proj's output gradient: one product.
	be.CopyColumns(a.dxdbl, a.ddlt, BT, R, R+2*N, 0, R, 0)
	be.CopyColumns(a.dxdbl, a.dbm, BT, N, R+2*N, R, N, 0)
	be.CopyColumns(a.dxdbl, a.dcm, BT, N, R+2*N, R+N, N, 0)
	// x_proj's weight gradient; its input gradient joins a.da inside the
	// SiLU's backward, never stored.
	be.MatMulBackward(nil, Gr("ssm.x_proj.weight"), a.dxdbl, la.a, P("ssm.x_proj.weight"), BT, R+2*N, E)
	be.SiLUMatMulBackward(a.daConv, a.da, a.dxdbl, P("ssm.x_proj.weight"), la.aConv, BT, R+2*N, E)
	be.Conv1dBackward(a.daPre, Gr("ssm.conv.weight"), Gr("ssm.conv.bias"), a.daConv, la.aPre, P("ssm.conv.weight"), B, T, E, K)
	win, gwin := P("ssm.in_proj.weight"), Gr("ssm.in_proj.weight")
	be.MatMulBackward(a.du, be.Slice(gwin, 0, E*d), a.daPre, la.u, be.Slice(win, 0, E*d), BT, E, d)
	be.MatMulBackward(a.du, be.Slice(gwin, E*d, E*d), a.dz, la.u, be.Slice(win, E*d, E*d), BT, E, d)
}

// ZeroGrads clears the gradient vector.
func (m *Model[F]) ZeroGrads() { m.be.Zero(m.Grads) }

// GradNorm is the global L2 norm of the gradients.
func (m *Model[F]) GradNorm() float64 { return math.Sqrt(m.be.SumSquares(m.Grads)) }
