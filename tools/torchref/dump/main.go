// Command torchref-dump writes the golden state of one B'MOJO model for the
// PyTorch reference check in tools/torchref (bmojo_ref.py): the initial
// parameters, one batch with its logits, losses and every parameter
// gradient, and the loss curve of a few optimizer steps, all in ONE
// safetensors file whose metadata carries the model config and the
// optimizer settings, so the Python side needs no other input.
//
//	go run ./tools/torchref/dump -preset bmojo-tiny -batch 2 -seq-len 0 -steps 10 -seed 1 -out golden.safetensors
//
// Tensors (docs/model.md §7 names): param.NAME (initial weights), grad.NAME
// (gradient of loss_total on the first batch), tokens and targets [B,T]
// int32 (the first batch; targets < 0 are ignored), logits [B,T,V],
// scalars loss_ce, loss_aux, loss_total (float64), and for the -steps
// optimizer steps: batch.tokens and batch.targets [steps,B,T] (one batch per
// step, batch 0 = tokens), curve (loss_total of each step before its
// update), curve.lr (the scheduled learning rate) and curve.grad_norm (the
// global gradient norm before clipping), all float64.
//
// For the eidetic memory it also stores what the backend's SelectChunks and
// Innovation ops produced in every bmojo layer with memory (in layer order):
// select [layers,B,T/C,k_sel] int32 and innovation [layers,B,T] for the
// first batch, and batch.select [steps,layers,B,T/C,k_sel] for every step.
// Selection is a top-k whose k-th and (k+1)-th innovations can lie closer
// than a float32 ulp, so rounding alone can flip it; the Python side compares
// its own selection with these and tells such a near-tie from a bug.
//
// -set KEY=VALUE (repeatable) overrides a config key of docs/model.md §1 after the
// preset and -seq-len, e.g. -set memory=5 -set memory_rope=none -set
// n_kv_head=2; VALUE is JSON (a bare word is a string).
//
// The body runs against kernels.Backend[float32]; openBackend is the one
// place that knows backend names, so a CUDA backend only needs a case there.
package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"

	"github.com/bmojo/bmojo/data"
	"github.com/bmojo/bmojo/internal/device"
	"github.com/bmojo/bmojo/internal/fsutil"
	"github.com/bmojo/bmojo/job"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cpu"
	"github.com/bmojo/bmojo/model"
)

// Format names the layout of the golden file; bmojo_ref.py checks it.
const Format = "bmojo-torchref/1"

// options are the command-line flags.
type options struct {
	preset     string
	batch      int
	seqLen     int
	steps      int
	seed       uint64
	out        string
	device     string
	lr         float64
	warmup     int
	ignoreFrac float64
	dataDir    string
	threads    int
	set        []string
}

func main() {
	var o options
	flag.StringVar(&o.preset, "preset", "bmojo-tiny", "model preset (model.Preset name, e.g. bmojo-tiny, mamba-small)")
	flag.IntVar(&o.batch, "batch", 2, "sequences per batch")
	flag.IntVar(&o.seqLen, "seq-len", 0, "sequence length; 0 = the preset's seq_len (a transformer preset's window follows it)")
	flag.IntVar(&o.steps, "steps", 10, "optimizer steps for the loss curve (0 = only the golden forward/backward)")
	flag.Uint64Var(&o.seed, "seed", 1, "seed for the initial weights, the batch order and the ignored labels")
	flag.StringVar(&o.out, "out", "golden.safetensors", "output file")
	flag.StringVar(&o.device, "device", "cpu", "kernel backend (cpu)")
	flag.Float64Var(&o.lr, "lr", job.Default().LR, "peak learning rate")
	flag.IntVar(&o.warmup, "warmup", 3, "linear warm-up steps (0 = train's default, 5% of -steps)")
	flag.Float64Var(&o.ignoreFrac, "ignore-frac", 0.1, "share of targets set to -1 (ignored), drawn from -seed")
	flag.StringVar(&o.dataDir, "data", "", "prepared dataset directory; empty = the bundled corpus")
	flag.IntVar(&o.threads, "threads", 0, "CPU threads (0 = all cores)")
	flag.Func("set", "override a config key, KEY=VALUE with VALUE in JSON (repeatable; e.g. memory=5)", func(s string) error {
		o.set = append(o.set, s)
		return nil
	})
	flag.Parse()
	if flag.NArg() > 0 {
		fail(fmt.Errorf("unexpected arguments %q", flag.Args()))
	}
	if o.threads > 0 {
		runtime.GOMAXPROCS(o.threads)
	}
	be, err := openBackend(o.device)
	if err != nil {
		fail(err)
	}
	if err := run(be, o); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "torchref-dump:", err)
	os.Exit(1)
}

// openBackend returns the float32 kernel backend called name: cpu, or a
// GPU (cuda, cuda:N) in a binary built with -tags cuda.
func openBackend(name string) (kernels.Backend[float32], error) {
	if name == "cpu" {
		return cpu.New[float32](), nil
	}
	if kind, _, err := device.Parse(name); err != nil || kind != "cuda" {
		return nil, fmt.Errorf("unknown -device %q (known: cpu, cuda, cuda:N)", name)
	}
	o, err := device.Open(name, device.Options{})
	if err != nil {
		return nil, err
	}
	return o.Backend, nil
}

// recorder wraps a backend to keep what SelectChunks and Innovation wrote
// (the model does not expose its activations); every other op goes straight
// through.
type recorder struct {
	kernels.Backend[float32]
	sel   [][]int32   // SelectChunks outputs since the last reset
	innov [][]float32 // Innovation outputs since the last reset
}

func (r *recorder) reset() { r.sel, r.innov = nil, nil }

// SelectChunks implements kernels.Backend.
func (r *recorder) SelectChunks(sel kernels.IntBuffer, e kernels.Buffer, B, T, C, S int) {
	r.Backend.SelectChunks(sel, e, B, T, C, S)
	h := make([]int32, sel.Len())
	r.Backend.DownloadInt(h, sel)
	r.sel = append(r.sel, h)
}

// Innovation implements kernels.Backend.
func (r *recorder) Innovation(e, u, p kernels.Buffer, Rw, d int) {
	r.Backend.Innovation(e, u, p, Rw, d)
	h := make([]float32, e.Len())
	r.Backend.Download(h, e)
	r.innov = append(r.innov, h)
}

// modelConfig resolves the preset, the -seq-len override and the -set ones.
func modelConfig(preset string, seqLen int, set []string) (model.Config, error) {
	c, err := model.Preset(preset)
	if err != nil {
		return c, err
	}
	if seqLen > 0 && seqLen != c.SeqLen {
		if c.Window == c.SeqLen { // transformer: the window covers the sequence
			c.Window, c.Chunk = seqLen, seqLen
		}
		c.SeqLen = seqLen
	}
	if len(set) > 0 {
		if err := applySet(&c, set); err != nil {
			return c, err
		}
	}
	if err := c.Validate(); err != nil {
		return c, fmt.Errorf("%s with -seq-len %d %s: %w", preset, seqLen, strings.Join(set, " "), err)
	}
	return c, nil
}

// applySet overrides config keys (JSON names) with KEY=VALUE strings.
func applySet(c *model.Config, set []string) error {
	b, err := json.Marshal(c)
	if err != nil {
		return err
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return err
	}
	for _, kv := range set {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("-set %q: want KEY=VALUE", kv)
		}
		if _, known := m[k]; !known {
			keys := make([]string, 0, len(m))
			for name := range m {
				keys = append(keys, name)
			}
			slices.Sort(keys)
			return fmt.Errorf("-set %q: unknown config key %q (keys: %s)", kv, k, strings.Join(keys, ", "))
		}
		var val any
		if json.Unmarshal([]byte(v), &val) != nil {
			val = v // a bare word: a string
		}
		m[k] = val
	}
	if b, err = json.Marshal(m); err != nil {
		return err
	}
	var out model.Config
	if err := json.Unmarshal(b, &out); err != nil {
		return fmt.Errorf("-set: %w", err)
	}
	*c = out
	return nil
}

// batches draws steps (at least one) batches of B sequences the way
// train does (sampler position step·B), then sets a seeded share of
// the targets to -1.
func batches(o options, T int) (tokens, targets [][]int32, err error) {
	ds, err := data.Load(o.dataDir, data.SplitTrain)
	if err != nil {
		return nil, nil, err
	}
	s, err := data.NewSampler(ds, T, o.seed)
	if err != nil {
		return nil, nil, err
	}
	rng := rand.New(rand.NewPCG(o.seed, 0x746f726368)) // "torch"
	for step := range max(1, o.steps) {
		tok, tgt := make([]int32, o.batch*T), make([]int32, o.batch*T)
		if err := s.Fill(0, step*o.batch, o.batch, tok, tgt); err != nil {
			return nil, nil, err
		}
		for i := range tgt {
			if rng.Float64() < o.ignoreFrac {
				tgt[i] = -1
			}
		}
		tokens, targets = append(tokens, tok), append(targets, tgt)
	}
	return tokens, targets, nil
}

func run(be kernels.Backend[float32], o options) error {
	if o.batch <= 0 || o.steps < 0 || o.seqLen < 0 || o.warmup < 0 || (o.steps > 0 && o.warmup > o.steps) ||
		o.ignoreFrac < 0 || o.ignoreFrac >= 1 || !(o.lr > 0) {
		return errors.New("need -batch > 0, -steps >= 0, -seq-len >= 0, 0 <= -warmup <= -steps, 0 <= -ignore-frac < 1, -lr > 0")
	}
	c, err := modelConfig(o.preset, o.seqLen, o.set)
	if err != nil {
		return err
	}
	B, T := o.batch, c.SeqLen
	toks, tgts, err := batches(o, T)
	if err != nil {
		return err
	}
	rec := &recorder{Backend: be}
	m, err := model.New[float32](rec, c, o.seed)
	if err != nil {
		return err
	}
	if err := m.Prepare(B, T); err != nil {
		return err
	}
	// The optimizer exactly as train builds it for a job.
	j := job.Default()
	j.Preset, j.Model = o.preset, c
	j.Steps, j.LR, j.WarmupSteps, j.Seed = max(1, o.steps), o.lr, min(o.warmup, max(1, o.steps)), o.seed
	oc := j.Optim()
	opt := model.NewOptimizer(m, oc)

	var out []tensor
	out = append(out, layoutTensors(m.Layout, m.ParamsHost(), "param.")...)
	nMem := 0
	for _, mx := range c.Mixers {
		if mx == model.MixerBMOJO && c.HasMemory() {
			nMem++
		}
	}
	var allSel [][]int32
	curve := make([]float64, o.steps)
	lrs := make([]float64, o.steps)
	norms := make([]float64, o.steps)
	for step := range max(1, o.steps) {
		m.ZeroGrads()
		rec.reset()
		l, err := m.Forward(toks[step], tgts[step])
		if err != nil {
			return fmt.Errorf("step %d: %w", step, err)
		}
		if err := m.Backward(); err != nil {
			return fmt.Errorf("step %d: %w", step, err)
		}
		if len(rec.sel) != nMem || len(rec.innov) != nMem {
			return fmt.Errorf("step %d: recorded %d selections and %d innovations, the config has %d memory layers",
				step, len(rec.sel), len(rec.innov), nMem)
		}
		allSel = append(allSel, slices.Concat(rec.sel...))
		if step == 0 {
			out = append(out, layoutTensors(m.Layout, m.GradsHost(), "grad.")...)
			if nMem > 0 {
				out = append(out,
					i32Tensor("select", []int{nMem, B, T / c.Chunk, c.SelectPerChunk}, allSel[0]),
					f32Tensor("innovation", []int{nMem, B, T}, slices.Concat(rec.innov...)))
			}
			out = append(out,
				f32Tensor("logits", []int{B, T, c.VocabSize}, m.Logits()),
				i32Tensor("tokens", []int{B, T}, toks[0]),
				i32Tensor("targets", []int{B, T}, tgts[0]),
				f64Tensor("loss_ce", nil, []float64{l.CE}),
				f64Tensor("loss_aux", nil, []float64{l.Aux}),
				f64Tensor("loss_total", nil, []float64{l.Total}),
			)
			fmt.Printf("%s B=%d T=%d params=%d: loss_ce %.6f loss_aux %.6f loss_total %.6f (%d labelled)\n",
				o.preset, B, T, m.Layout.Total, l.CE, l.Aux, l.Total, l.Labelled)
		}
		if o.steps == 0 {
			break
		}
		r := opt.Apply()
		if r.Skipped {
			return fmt.Errorf("step %d: non-finite gradient norm %v", step, r.GradNorm)
		}
		curve[step], lrs[step], norms[step] = l.Total, r.LR, r.GradNorm
	}
	if err := be.Err(); err != nil {
		return err
	}
	out = append(out,
		i32Tensor("batch.tokens", []int{o.steps, B, T}, slices.Concat(toks[:o.steps]...)),
		i32Tensor("batch.targets", []int{o.steps, B, T}, slices.Concat(tgts[:o.steps]...)),
		f64Tensor("curve", []int{o.steps}, curve),
		f64Tensor("curve.lr", []int{o.steps}, lrs),
		f64Tensor("curve.grad_norm", []int{o.steps}, norms),
	)
	if nMem > 0 {
		out = append(out, i32Tensor("batch.select", []int{o.steps, nMem, B, T / c.Chunk, c.SelectPerChunk},
			slices.Concat(allSel[:o.steps]...)))
	}
	if o.steps > 0 {
		fmt.Printf("curve: %s\n", fmtFloats(curve))
	}

	optJSON, err := json.Marshal(oc)
	if err != nil {
		return err
	}
	var decay []string
	for _, t := range m.Layout.Tensors {
		if t.Decay {
			decay = append(decay, t.Name)
		}
	}
	decayJSON, err := json.Marshal(decay)
	if err != nil {
		return err
	}
	meta := model.ConfigMetadata(c)
	meta["format"] = Format
	meta["optim"] = string(optJSON)
	meta["decay"] = string(decayJSON)
	meta["preset"] = o.preset
	meta["set"] = strings.Join(o.set, " ")
	meta["batch"] = strconv.Itoa(B)
	meta["seq_len"] = strconv.Itoa(T)
	meta["steps"] = strconv.Itoa(o.steps)
	meta["seed"] = strconv.FormatUint(o.seed, 10)
	meta["ignore_frac"] = strconv.FormatFloat(o.ignoreFrac, 'g', -1, 64)
	meta["backend"] = be.Name()
	meta["dtype"] = "float32"
	meta["go"] = runtime.Version()
	if err := writeFile(o.out, out, meta); err != nil {
		return err
	}
	fmt.Printf("wrote %s (%d tensors)\n", o.out, len(out))
	return nil
}

func fmtFloats(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = strconv.FormatFloat(x, 'f', 5, 64)
	}
	return strings.Join(s, " ")
}

// tensor is one entry of the output file, already encoded little-endian.
type tensor struct {
	name  string
	dtype string // F32, F64 or I32
	shape []int
	data  []byte
}

func layoutTensors(l *model.Layout, flat []float64, prefix string) []tensor {
	out := make([]tensor, 0, len(l.Tensors))
	for _, t := range l.Tensors {
		out = append(out, f64asF32(prefix+t.Name, t.Shape, flat[t.Offset:t.Offset+t.Size()]))
	}
	return out
}

func f64asF32(name string, shape []int, v []float64) tensor {
	b := make([]byte, 0, 4*len(v))
	for _, x := range v {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(float32(x)))
	}
	return tensor{name, "F32", slices.Clone(shape), b}
}

func f32Tensor(name string, shape []int, v []float32) tensor {
	b := make([]byte, 0, 4*len(v))
	for _, x := range v {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(x))
	}
	return tensor{name, "F32", shape, b}
}

func f64Tensor(name string, shape []int, v []float64) tensor {
	b := make([]byte, 0, 8*len(v))
	for _, x := range v {
		b = binary.LittleEndian.AppendUint64(b, math.Float64bits(x))
	}
	return tensor{name, "F64", shape, b}
}

func i32Tensor(name string, shape []int, v []int32) tensor {
	b := make([]byte, 0, 4*len(v))
	for _, x := range v {
		b = binary.LittleEndian.AppendUint32(b, uint32(x))
	}
	return tensor{name, "I32", shape, b}
}

// writeFile stores tensors in safetensors format (internal/safetensors
// writes F32 only; tokens need I32 and the scalars F64), sorted by name,
// header padded to 8 bytes, atomically (fsutil.WriteFile).
func writeFile(path string, ts []tensor, meta map[string]string) error {
	ts = slices.Clone(ts)
	slices.SortFunc(ts, func(a, b tensor) int { return strings.Compare(a.name, b.name) })
	type entry struct {
		DType       string  `json:"dtype"`
		Shape       []int   `json:"shape"`
		DataOffsets []int64 `json:"data_offsets"`
	}
	header := map[string]any{"__metadata__": meta}
	var off int64
	for i, t := range ts {
		if i > 0 && ts[i-1].name == t.name {
			return fmt.Errorf("duplicate tensor %q", t.name)
		}
		n, size := 1, map[string]int{"F32": 4, "F64": 8, "I32": 4}[t.dtype]
		for _, d := range t.shape {
			n *= d
		}
		if n*size != len(t.data) {
			return fmt.Errorf("tensor %q: shape %v of %s needs %d bytes, have %d", t.name, t.shape, t.dtype, n*size, len(t.data))
		}
		shape := t.shape
		if shape == nil {
			shape = []int{}
		}
		header[t.name] = entry{t.dtype, shape, []int64{off, off + int64(len(t.data))}}
		off += int64(len(t.data))
	}
	js, err := json.Marshal(header)
	if err != nil {
		return err
	}
	if pad := len(js) % 8; pad != 0 {
		js = append(js, strings.Repeat(" ", 8-pad)...)
	}
	_, err = fsutil.WriteFile(path, func(w io.Writer) error {
		if _, err := w.Write(binary.LittleEndian.AppendUint64(nil, uint64(len(js)))); err != nil {
			return err
		}
		if _, err := w.Write(js); err != nil {
			return err
		}
		for _, t := range ts {
			if _, err := w.Write(t.data); err != nil {
				return err
			}
		}
		return nil
	})
	return err
}
