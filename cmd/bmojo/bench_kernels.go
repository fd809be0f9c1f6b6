package main

import (
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/bmojo/bmojo/internal/device"
	"github.com/bmojo/bmojo/kernels"
	"github.com/bmojo/bmojo/kernels/cuda"
	"github.com/bmojo/bmojo/model"
)

// kernelRow is one line of bench kernels.
type kernelRow struct {
	Op    string `json:"op"`
	Shape string `json:"shape"`
	// RelErr is max |gpu−cpu| / max |cpu| at the validation size, for the
	// output nearest its tolerance; Tol is the most that output may have
	// (checkRows).
	RelErr float64 `json:"rel_err"`
	Tol    float64 `json:"tol"`
	Ms     float64 `json:"ms"`
	TFLOPs float64 `json:"tflops,omitempty"`
	GBs    float64 `json:"gb_per_s,omitempty"`
}

func init() {
	var (
		preset, dev, jsonOut string
		batch, seqLen, reps  int
		noLt, noTune         bool
	)
	cmd := &cobra.Command{
		Use:   "kernels",
		Short: "Validate each GPU kernel against the CPU backend, then time it at a preset's shapes",
		Long: `For the matrix products of one layer (and the head) and the main ops of a
preset, run the GPU backend and the CPU backend on the same inputs at a
small size and report the largest relative difference, max |gpu−cpu| /
max |cpu|, then time the GPU op at the full training shape (batch × seq-len)
and report ms with TFLOP/s (matrix products) or GB/s (the rest: bytes read +
written once).

Each op is held to its row of the conformance suite's tolerance table
(kernels.Tolerances: float32, or bf16 for attention on tensor cores). Both
backends may be Abs + Rel·|x| from the exact x, so they may differ by twice
that: a relative difference of at most 2·(Rel + Abs / max |cpu|), the "tol"
column. As in the suite, the inputs of bf16 products are drawn
bf16-representable, so the check sees indexing and accumulation rather than
bf16 rounding (which model-level parity checks). The command prints every
row, then exits non-zero naming each op above its tolerance.

bench/torch_matmul.py times torch.matmul on the same shapes from --json.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := model.Preset(preset)
			if err != nil {
				return err
			}
			if seqLen > 0 {
				c.SeqLen = seqLen
			}
			o, err := device.Open(dev, device.Options{Logger: newLogger(), NoCublasLt: noLt, NoGemmTune: noTune})
			if err != nil {
				return err
			}
			defer o.Close()
			if o.Kind != "cuda" {
				return fmt.Errorf("bench kernels: needs a GPU (--device cuda in a binary built with -tags %s)", "cuda")
			}
			rows, err := benchKernels(o.Backend, device.CPU(), c, batch, reps)
			if err != nil {
				return err
			}
			fmt.Printf("%s, preset %s, batch %d × %d\n", o.Desc, preset, batch, c.SeqLen)
			w := 26
			for _, r := range rows {
				w = max(w, len(r.Op))
			}
			fmt.Printf("%-*s %-22s %10s %10s %10s %10s\n", w, "op", "shape", "rel err", "tol", "ms", "TFLOP/s|GB/s")
			for _, r := range rows {
				rate := fmt.Sprintf("%.1f GB/s", r.GBs)
				if r.TFLOPs > 0 {
					rate = fmt.Sprintf("%.1f TFLOP/s", r.TFLOPs)
				}
				miss := ""
				if !r.withinTol() {
					miss = "  ABOVE TOLERANCE"
				}
				fmt.Printf("%-*s %-22s %10.2e %10.2e %10.3f %14s%s\n", w, r.Op, r.Shape, r.RelErr, r.Tol, r.Ms, rate, miss)
			}
			printGemmTunings(o.Dev)
			if err := writeJSON(jsonOut, rows); err != nil {
				return err
			}
			return checkRows(rows)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&preset, "preset", "bmojo-130m", "model preset whose shapes are used")
	fl.IntVar(&batch, "batch-size", 8, "sequences")
	fl.IntVar(&seqLen, "seq-len", 0, "sequence length (default: the preset's)")
	fl.IntVar(&reps, "reps", 10, "timed repetitions per op")
	fl.StringVar(&dev, "device", "cuda", "cuda or cuda:N")
	fl.StringVar(&jsonOut, "json", "", "also write the rows to this JSON file")
	fl.BoolVar(&noLt, "no-cublaslt", false, "bf16 products through cublasGemmEx instead of cublasLtMatmul")
	fl.BoolVar(&noTune, "no-gemm-tune", false, "keep cuBLASLt's first-guess algorithm per product shape instead of timing its candidates")
	benchCmd.AddCommand(cmd)
}

// printGemmTunings lists how the cuBLASLt algorithm of each product shape
// was chosen: the heuristic's first guess against the fastest candidate
// timed on the shape (cuda.Options.NoGemmTune), largest gain first.
func printGemmTunings(dev *cuda.Device) {
	var ts []cuda.GemmTuning
	for _, t := range dev.GemmTunings() {
		if t.ChosenMs > 0 || t.Note != "" { // timed, or why not
			ts = append(ts, t)
		}
	}
	if len(ts) == 0 {
		return
	}
	fmt.Printf("\ncuBLASLt algorithm per product shape (column-major C[M,N], K terms): first guess against the fastest candidate timed\n")
	fmt.Printf("%-22s %-4s %-3s %10s %7s %10s %10s %7s\n", "M×N×K", "op", "C", "candidates", "chosen", "first ms", "chosen ms", "gain")
	tr := map[bool]string{false: "N", true: "T"}
	for _, t := range ts {
		acc := "="
		if t.Accumulate {
			acc = "+="
		}
		shape := fmt.Sprintf("%d×%d×%d", t.M, t.N, t.K)
		if t.Note != "" {
			fmt.Printf("%-22s %-4s %-3s %10d  %s\n", shape, tr[t.TransA]+tr[t.TransB], acc, t.Candidates, t.Note)
			continue
		}
		fmt.Printf("%-22s %-4s %-3s %10d %7d %10.4f %10.4f %6.2f×\n", shape, tr[t.TransA]+tr[t.TransB], acc, t.Candidates, t.Chosen, t.HeuristicMs, t.ChosenMs, t.HeuristicMs/t.ChosenMs)
	}
}

// pair holds the same data on the GPU (g) and the CPU (c).
type pair struct{ g, c kernels.Buffer }

type kbench struct {
	gpu, cpu kernels.Backend[float32]
	rng      *rand.Rand
	// mmBF16 and attnBF16 report that the GPU rounds the inputs of its
	// products (attention's) to bfloat16 (kernels.BF16MatMul,
	// BF16Attention).
	mmBF16, attnBF16 bool
}

func (k *kbench) rand(n int, scale float64) pair { return k.draw(n, scale, false) }

// mmRand is rand for the input of a matrix product: bf16-representable
// when the GPU's products round to bf16.
func (k *kbench) mmRand(n int, scale float64) pair { return k.draw(n, scale, k.mmBF16) }

// attnRand is rand for an input of attention's products:
// bf16-representable when they round to bf16.
func (k *kbench) attnRand(n int, scale float64) pair { return k.draw(n, scale, k.attnBF16) }

// draw uploads the same n normal values times scale to both backends,
// rounded to bfloat16 when bf16.
func (k *kbench) draw(n int, scale float64, bf16 bool) pair {
	h := make([]float32, n)
	for i := range h {
		h[i] = float32(k.rng.NormFloat64() * scale)
		if bf16 {
			h[i] = kernels.RoundBF16(h[i])
		}
	}
	p := pair{k.gpu.Alloc(n), k.cpu.Alloc(n)}
	k.gpu.Upload(p.g, h)
	k.cpu.Upload(p.c, h)
	return p
}

func (k *kbench) zeros(n int) pair { return pair{k.gpu.Alloc(n), k.cpu.Alloc(n)} }

// relErr compares the GPU and CPU contents of each output in ps under t,
// a tolerance of the conformance suite, and returns the relative error of
// the output nearest its bound (or furthest above it) and that bound. An
// output's relative error is max |gpu−cpu| / max |cpu| (max |gpu−cpu| when
// the CPU's is all zeros). Both backends may be Abs + Rel·|exact| from the
// exact result, so they may differ by twice that, which bounds the
// relative error by 2·(Rel + Abs / max |cpu|) (2·Abs for all zeros).
func (k *kbench) relErr(t kernels.Tol, ps ...pair) (rel, tol float64) {
	for j, p := range ps {
		g, c := make([]float32, p.g.Len()), make([]float32, p.c.Len())
		k.gpu.Download(g, p.g)
		k.cpu.Download(c, p.c)
		var maxRef, maxDiff float64
		for i := range g {
			maxRef = max(maxRef, math.Abs(float64(c[i])))
			d := math.Abs(float64(g[i]) - float64(c[i]))
			if math.IsNaN(d) {
				d = math.Inf(1)
			}
			maxDiff = max(maxDiff, d)
		}
		r, b := maxDiff, 2*t.Abs
		if maxRef > 0 {
			r, b = maxDiff/maxRef, 2*(t.Rel+t.Abs/maxRef)
		}
		if math.IsNaN(r) { // a NaN on the CPU
			r = math.Inf(1)
		}
		if j == 0 || r-b > rel-tol {
			rel, tol = r, b
		}
	}
	return rel, tol
}

// tolerance returns the conformance suite's tolerance of op (a method of
// kernels.Backend) for the GPU backend: its float32 row, or its bf16 row
// where the GPU's attention runs on bf16 tensor cores.
func (k *kbench) tolerance(op string) (kernels.Tol, error) {
	if t, ok := kernels.BF16Tolerances[op]; ok && k.attnBF16 {
		return t, nil
	}
	row, ok := kernels.Tolerances[op]
	if !ok {
		return kernels.Tol{}, fmt.Errorf("no tolerance row for %s in kernels.Tolerances", op)
	}
	return row.F32, nil
}

// withinTol reports whether r's relative error is at most its tolerance.
func (r kernelRow) withinTol() bool { return r.RelErr <= r.Tol }

// checkRows fails, naming every row whose relative error is above its
// tolerance (or NaN).
func checkRows(rows []kernelRow) error {
	var miss []string
	for _, r := range rows {
		if !r.withinTol() {
			miss = append(miss, fmt.Sprintf("%s: rel err %.3g above its tolerance %.3g", r.Op, r.RelErr, r.Tol))
		}
	}
	if len(miss) > 0 {
		return fmt.Errorf("bench kernels: %d of %d kernels miss their tolerance (kernels.Tolerances): %s", len(miss), len(rows), strings.Join(miss, "; "))
	}
	return nil
}

// timeOp times f: two calls (the first makes any plan; the second gives
// the call's rough cost), then calls for about
// 25 ms untimed (a GPU idle during the CPU's validation runs at low clocks
// at first), then at least reps calls and at least 25 ms of them. ms per
// call, from the host clock: bench/torch_matmul.py times torch the same way.
func (k *kbench) timeOp(reps int, f func()) (float64, error) {
	const span = 25 * time.Millisecond
	f()
	if err := k.gpu.Err(); err != nil {
		return 0, err
	}
	t0 := time.Now()
	f()
	if err := k.gpu.Err(); err != nil {
		return 0, err
	}
	n := max(reps, int(span/max(time.Since(t0), time.Microsecond)))
	for range n {
		f()
	}
	if err := k.gpu.Err(); err != nil {
		return 0, err
	}
	t0 = time.Now()
	for range n {
		f()
	}
	if err := k.gpu.Err(); err != nil {
		return 0, err
	}
	return 1e3 * time.Since(t0).Seconds() / float64(n), nil
}

// kernelCase is one op: run it on one backend's buffers (made by setup at
// a batch × length) and say how much work that is. op is the
// kernels.Backend method whose tolerance (kernels.Tolerances) its
// outputs are held to.
type kernelCase struct {
	name, op string
	setup    func(k *kbench, B, T int) (run func(gpu bool), outs []pair, flops, bytes float64, shape string)
}

func benchKernels(gpu, cpu kernels.Backend[float32], c model.Config, batch, reps int) ([]kernelRow, error) {
	k := &kbench{gpu: gpu, cpu: cpu, rng: rand.New(rand.NewPCG(5, 6))}
	if r, ok := gpu.(kernels.BF16MatMul); ok {
		k.mmBF16 = r.MatMulBF16()
	}
	if r, ok := gpu.(kernels.BF16Attention); ok {
		k.attnBF16 = r.AttentionBF16()
	}
	var cases []kernelCase
	// The matrix products of one layer and the head, forward and backward.
	l := model.NewLayout(c)
	seen := map[string]bool{}
	prefix := "layers.0."
	for _, t := range l.Tensors {
		if !t.Decay || len(t.Shape) != 2 || strings.HasSuffix(t.Name, "conv.weight") ||
			(strings.HasPrefix(t.Name, "layers.") && !strings.HasPrefix(t.Name, prefix)) {
			continue // not a matrix product of layer 0
		}
		N, K := t.Shape[0], t.Shape[1]
		key := fmt.Sprintf("%dx%d", N, K)
		if seen[key] {
			continue
		}
		seen[key] = true
		name := strings.TrimSuffix(strings.TrimPrefix(t.Name, prefix), ".weight")
		for _, convert := range []bool{false, true} {
			cases = append(cases, matmulCase(name, N, K, false, convert, false), matmulCase(name, N, K, true, convert, dxWritten[name]))
		}
		if name == fusedX {
			cases = append(cases, fusedXCases(N, K)...)
		}
	}
	if c.DFF > 0 {
		// The MLP runs W_gate and W_up as one product ([2F, d], stacked in the
		// layout): the shape the step runs, beside the two halves above.
		for _, convert := range []bool{false, true} {
			cases = append(cases, matmulCase("mlp.gate|up", 2*c.DFF, c.DModel, false, convert, false),
				matmulCase("mlp.gate|up", 2*c.DFF, c.DModel, true, convert, false))
		}
	}
	cases = append(cases, matmulCase("head", c.VocabSize, c.DModel, false, false, false), matmulCase("head", c.VocabSize, c.DModel, false, true, false))
	d, E, N := c.DModel, c.DInner, c.DState
	cases = append(cases,
		kernelCase{"RMSNorm", "RMSNorm", func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
			x, g, out, rs := k.rand(B*T*d, 1), k.rand(d, 1), k.zeros(B*T*d), k.zeros(B*T)
			return func(onGPU bool) {
				be, p := k.pick(onGPU)
				be.RMSNorm(p(out), p(rs), p(x), p(g), B*T, d)
			}, []pair{out}, 0, 8 * float64(B*T*d), fmt.Sprintf("%d×%d", B*T, d)
		}},
		kernelCase{"SwiGLU", "SwiGLU", func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
			n := B * T * max(c.DFF, 1)
			g, u, h := k.rand(n, 1), k.rand(n, 1), k.zeros(n)
			return func(onGPU bool) {
				be, p := k.pick(onGPU)
				be.SwiGLU(p(h), p(g), p(u))
			}, []pair{h}, 0, 12 * float64(n), fmt.Sprintf("%d", n)
		}},
		kernelCase{"SwiGLUPacked", "SwiGLUPacked", func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
			F := max(c.DFF, 1)
			gu, h := k.rand(B*T*2*F, 1), k.zeros(B*T*F)
			return func(onGPU bool) {
				be, p := k.pick(onGPU)
				be.SwiGLUPacked(p(h), p(gu), B*T, F)
			}, []pair{h}, 0, 12 * float64(B*T*F), fmt.Sprintf("%d×2·%d", B*T, F)
		}},
		kernelCase{"SwiGLUPackedBackward", "SwiGLUPackedBackward", func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
			F := max(c.DFF, 1)
			gu, dh, dgu := k.rand(B*T*2*F, 1), k.rand(B*T*F, 1), k.zeros(B*T*2*F)
			return func(onGPU bool) {
				be, p := k.pick(onGPU)
				be.SwiGLUPackedBackward(p(dgu), p(dh), p(gu), B*T, F)
			}, []pair{dgu}, 0, 28 * float64(B*T*F), fmt.Sprintf("%d×2·%d", B*T, F)
		}},
		kernelCase{"Conv1dSiLU", "Conv1dSiLU", func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
			x, w, bias, out, act := k.rand(B*T*E, 1), k.rand(E*c.DConv, 0.5), k.rand(E, 1), k.zeros(B*T*E), k.zeros(B*T*E)
			return func(onGPU bool) {
				be, p := k.pick(onGPU)
				be.Conv1dSiLU(p(out), p(act), p(x), p(w), p(bias), B, T, E, c.DConv)
			}, []pair{out, act}, 0, 12 * float64(B*T*E), fmt.Sprintf("%d×%d×%d", B, T, E)
		}},
		kernelCase{"Conv1d", "Conv1d", func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
			x, w, bias, out := k.rand(B*T*E, 1), k.rand(E*c.DConv, 0.5), k.rand(E, 1), k.zeros(B*T*E)
			return func(onGPU bool) {
				be, p := k.pick(onGPU)
				be.Conv1d(p(out), p(x), p(w), p(bias), B, T, E, c.DConv)
			}, []pair{out}, 0, 8 * float64(B*T*E), fmt.Sprintf("%d×%d×%d", B, T, E)
		}},
		kernelCase{"Conv1dBackward", "Conv1dBackward", func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
			x, w, dout := k.rand(B*T*E, 1), k.rand(E*c.DConv, 0.5), k.rand(B*T*E, 1)
			dx, dw, db := k.zeros(B*T*E), k.zeros(E*c.DConv), k.zeros(E)
			return func(onGPU bool) {
				be, p := k.pick(onGPU)
				be.Conv1dBackward(p(dx), p(dw), p(db), p(dout), p(x), p(w), B, T, E, c.DConv)
			}, []pair{dx, dw, db}, 0, 16 * float64(B*T*E), fmt.Sprintf("%d×%d×%d", B, T, E)
		}},
		kernelCase{"SelectiveScan", "SelectiveScan", func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
			x, dt, z := k.rand(B*T*E, 1), k.rand(B*T*E, 1), k.rand(B*T*E, 1)
			dtb, alog, dsk := k.rand(E, 0.5), k.rand(E*N, 0.5), k.rand(E, 1)
			bm, cm, out := k.rand(B*T*N, 1), k.rand(B*T*N, 1), k.zeros(B*T*E)
			return func(onGPU bool) {
				be, p := k.pick(onGPU)
				be.SelectiveScan(p(out), p(x), p(dt), p(dtb), p(alog), p(bm), p(cm), p(dsk), p(z), B, T, E, N)
			}, []pair{out}, 0, 16 * float64(B*T*E), fmt.Sprintf("%d×%d×%d×%d", B, T, E, N)
		}},
		kernelCase{"SelectiveScanBackward", "SelectiveScanBackward", func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
			x, dt, z := k.rand(B*T*E, 1), k.rand(B*T*E, 1), k.rand(B*T*E, 1)
			dtb, alog, dsk := k.rand(E, 0.5), k.rand(E*N, 0.5), k.rand(E, 1)
			bm, cm, dout := k.rand(B*T*N, 1), k.rand(B*T*N, 1), k.rand(B*T*E, 1)
			dx, ddt, dz := k.zeros(B*T*E), k.zeros(B*T*E), k.zeros(B*T*E)
			ddtb, dalog, ddsk := k.zeros(E), k.zeros(E*N), k.zeros(E)
			dbm, dcm := k.zeros(B*T*N), k.zeros(B*T*N)
			return func(onGPU bool) {
				be, p := k.pick(onGPU)
				be.SelectiveScanBackward(p(dx), p(ddt), p(ddtb), p(dalog), p(dbm), p(dcm), p(ddsk), p(dz), p(dout),
					p(x), p(dt), p(dtb), p(alog), p(bm), p(cm), p(dsk), p(z), B, T, E, N)
			}, []pair{dx, ddt, dz, dbm, dcm}, 0, 32 * float64(B*T*E), fmt.Sprintf("%d×%d×%d×%d", B, T, E, N)
		}},
	)
	if c.NHead > 0 {
		cases = append(cases, attnCase(c, false), attnCase(c, true))
	}
	cases = append(cases,
		kernelCase{"CrossEntropy+Backward", "CrossEntropy", func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
			V := c.VocabSize
			lg, loss, dl := k.rand(B*T*V, 2), k.zeros(B*T), k.zeros(B*T*V)
			tg := make([]int32, B*T)
			for i := range tg {
				tg[i] = int32(k.rng.IntN(V))
			}
			tgG, tgC := k.gpu.AllocInt(B*T), k.cpu.AllocInt(B*T)
			k.gpu.UploadInt(tgG, tg)
			k.cpu.UploadInt(tgC, tg)
			return func(onGPU bool) {
				be, p := k.pick(onGPU)
				t := tgC
				if onGPU {
					t = tgG
				}
				be.CrossEntropy(p(loss), p(lg), t, B*T, V)
				be.CrossEntropyBackward(p(dl), p(lg), t, 1.0/float64(B*T), B*T, V)
			}, []pair{loss}, 0, 12 * float64(B*T*V), fmt.Sprintf("%d×%d", B*T, V)
		}},
	)
	var rows []kernelRow
	for _, kc := range cases {
		// Validate at a small size against the CPU.
		vT := min(c.SeqLen, 256)
		t, err := k.tolerance(kc.op)
		if err != nil {
			return rows, fmt.Errorf("%s: %w", kc.name, err)
		}
		run, outs, _, _, _ := kc.setup(k, 1, vT)
		run(true)
		run(false)
		if err := k.gpu.Err(); err != nil {
			return rows, fmt.Errorf("%s: %w", kc.name, err)
		}
		rel, tol := k.relErr(t, outs...)
		// Time at the full shape.
		run, _, flops, bytes, shape := kc.setup(k, batch, c.SeqLen)
		ms, err := k.timeOp(reps, func() { run(true) })
		if err != nil {
			return rows, fmt.Errorf("%s: %w", kc.name, err)
		}
		r := kernelRow{Op: kc.name, Shape: shape, RelErr: rel, Tol: tol, Ms: ms}
		if flops > 0 {
			r.TFLOPs = flops / (ms / 1e3) / 1e12
		} else {
			r.GBs = bytes / (ms / 1e3) / 1e9
		}
		rows = append(rows, r)
	}
	if r, ok := fusedXRow(rows); ok {
		rows = append(rows, r)
	}
	// What every op costs the host before any GPU work: a one-element Scale
	// (checks, the hop to the device thread, the launch), many times over.
	one := k.gpu.Alloc(1)
	ms, err := k.timeOp(1000*reps, func() { k.gpu.Scale(one, 1) })
	if err != nil {
		return rows, fmt.Errorf("dispatch: %w", err)
	}
	return append(rows, kernelRow{Op: "dispatch (1-element Scale)", Shape: "1", Ms: ms}), nil
}

// pick returns the backend and a selector of its half of a pair.
func (k *kbench) pick(onGPU bool) (kernels.Backend[float32], func(pair) kernels.Buffer) {
	if onGPU {
		return k.gpu, func(p pair) kernels.Buffer { return p.g }
	}
	return k.cpu, func(p pair) kernels.Buffer { return p.c }
}

// forgetInputCopies makes the next product convert its inputs to bf16
// again, as the first product after a write does in the model.
func forgetInputCopies(be kernels.Backend[float32]) {
	if f, ok := be.(interface{ ForgetInputCopies() }); ok {
		f.ForgetInputCopies()
	}
}

// dxWritten names the products whose backward writes its dx first in a
// training step (model.Backward zeroes that gradient right before, and the
// product overwrites it): dt_proj's, out_proj's, gate_proj's and
// down_proj's. The others add to a gradient another op wrote: x_proj's and
// in_proj's, and q_proj's shape stands for q and v, which add (k's writes).
var dxWritten = map[string]bool{"ssm.dt_proj": true, "ssm.out_proj": true, "mlp.gate_proj": true, "mlp.down_proj": true}

// matmulCase is out[Rw,N] = x[Rw,K]·w[N,K]ᵀ, or its backward (dx and dw).
// Without convert, x and w are read from the bf16 copies the backend keeps
// (a training step converts each weight and saved activation once and reads
// it several times); dout, a fresh gradient, is converted by every backward.
// With convert, every input is converted in every call. The backward adds
// to dx, or with written overwrites it (dx pending a Zero), as the step
// does (dxWritten); dw always adds.
func matmulCase(name string, N, K int, backward, convert, written bool) kernelCase {
	op := "MatMul " + name
	if backward {
		op = "MatMulBackward " + name
		if written {
			op += " (dx written)"
		}
		if name == fusedX {
			op += notInStep
		}
	}
	if convert {
		op += " +conv"
	}
	method := "MatMul"
	if backward {
		method = "MatMulBackward"
	}
	return kernelCase{op, method, func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
		Rw := B * T
		x, w := k.mmRand(Rw*K, 1), k.mmRand(N*K, 1/math.Sqrt(float64(K)))
		shape := fmt.Sprintf("%d×%d×%d", Rw, N, K)
		if !backward {
			out := k.zeros(Rw * N)
			return func(onGPU bool) {
				be, p := k.pick(onGPU)
				if convert {
					forgetInputCopies(be)
				}
				be.MatMul(p(out), p(x), p(w), Rw, N, K, false)
			}, []pair{out}, 2 * float64(Rw) * float64(N) * float64(K), 0, shape
		}
		dout, dx, dw := k.mmRand(Rw*N, 1), k.zeros(Rw*K), k.zeros(N*K)
		return func(onGPU bool) { // dx and dw start at zero; timed repetitions accumulate
			be, p := k.pick(onGPU)
			if convert {
				forgetInputCopies(be)
			}
			if written {
				be.Zero(p(dx))
			}
			be.MatMulBackward(p(dx), p(dw), p(dout), p(x), p(w), Rw, N, K)
		}, []pair{dx, dw}, 4 * float64(Rw) * float64(N) * float64(K), 0, shape
	}}
}

// fusedX is the product whose input gradient the training step computes
// inside the SiLU's backward (kernels.Backend.SiLUMatMulBackward).
const fusedX = "ssm.x_proj"

// notInStep marks a product row the training step does not run as such:
// bench/torch_matmul.py prints it and leaves it out of the worst ratio.
const notInStep = " (not in the step)"

// fusedXCases time the pieces of x_proj's backward as the step runs it:
// the weight gradient alone, and SiLU's backward with and without the
// input gradient's product inside.
func fusedXCases(N, K int) []kernelCase {
	silu := func(fused bool) kernelCase {
		name, method := "SiLUBackward", "SiLUBackward"
		if fused {
			name, method = "SiLUMatMulBackward "+fusedX, "SiLUMatMulBackward"
		}
		return kernelCase{name, method, func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
			Rw := B * T
			x, dr, dx := k.rand(Rw*K, 1), k.rand(Rw*K, 1), k.zeros(Rw*K)
			dout, w := k.mmRand(Rw*N, 1), k.mmRand(N*K, 1/math.Sqrt(float64(K)))
			return func(onGPU bool) {
				be, p := k.pick(onGPU)
				be.Zero(p(dx)) // as in the step: written, not added to
				if fused {
					be.SiLUMatMulBackward(p(dx), p(dr), p(dout), p(w), p(x), Rw, N, K)
				} else {
					be.SiLUBackward(p(dx), p(dr), p(x))
				}
			}, []pair{dx}, 0, 12 * float64(Rw*K), fmt.Sprintf("%d×%d×%d", Rw, N, K)
		}}
	}
	dw := kernelCase{fusedX + " dW (MatMulBackward, no dx)", "MatMulBackward", func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
		Rw := B * T
		x, w, dout, dw := k.mmRand(Rw*K, 1), k.mmRand(N*K, 1/math.Sqrt(float64(K))), k.mmRand(Rw*N, 1), k.zeros(N*K)
		return func(onGPU bool) {
			be, p := k.pick(onGPU)
			be.MatMulBackward(nil, p(dw), p(dout), p(x), p(w), Rw, N, K)
		}, []pair{dw}, 2 * float64(Rw) * float64(N) * float64(K), 0, fmt.Sprintf("%d×%d×%d", Rw, N, K)
	}}
	return []kernelCase{dw, silu(false), silu(true)}
}

// fusedXRow is x_proj's backward as the step runs it: the weight
// gradient's product, plus what the input gradient's product adds to the
// SiLU's backward it runs inside.
func fusedXRow(rows []kernelRow) (kernelRow, bool) {
	ms := map[string]float64{}
	var shape string
	var worst kernelRow // the piece nearest its tolerance
	for _, r := range rows {
		ms[r.Op] = r.Ms
		switch r.Op {
		case fusedX + " dW (MatMulBackward, no dx)":
			shape = r.Shape
			fallthrough
		case "SiLUMatMulBackward " + fusedX:
			if worst.Op == "" || r.RelErr-r.Tol > worst.RelErr-worst.Tol {
				worst = r
			}
		}
	}
	dw, ok1 := ms[fusedX+" dW (MatMulBackward, no dx)"]
	with, ok2 := ms["SiLUMatMulBackward "+fusedX]
	without, ok3 := ms["SiLUBackward"]
	if !ok1 || !ok2 || !ok3 {
		return kernelRow{}, false
	}
	var Rw, N, K float64
	fmt.Sscanf(strings.ReplaceAll(shape, "×", " "), "%g %g %g", &Rw, &N, &K)
	t := dw + with - without
	return kernelRow{Op: "MatMulBackward " + fusedX + " (as in the step: dx in SiLU's backward)", Shape: shape, RelErr: worst.RelErr, Tol: worst.Tol, Ms: t,
		TFLOPs: 4 * Rw * N * K / (t / 1e3) / 1e12}, true
}

// attnCase is the B'MOJO attention of the preset's first attention layer.
func attnCase(c model.Config, backward bool) kernelCase {
	name := "Attention"
	if backward {
		name = "AttentionBackward"
	}
	return kernelCase{name, name, func(k *kbench, B, T int) (func(bool), []pair, float64, float64, string) {
		H, G, D := c.NHead, c.NKVHead, c.HeadDim
		s := kernels.AttnShape{B: B, T: T, H: H, G: G, D: D, Wc: c.Window}
		bmojo := false
		for _, m := range c.Mixers {
			bmojo = bmojo || m == model.MixerBMOJO
		}
		if bmojo {
			s.Wf = c.FadingWindow
			if c.HasMemory() {
				s.C, s.S, s.M, s.Delta = c.Chunk, c.SelectPerChunk, c.Memory, c.MemoryDelay()
			}
		}
		q, kk, v := k.attnRand(B*T*H*D, 1), k.attnRand(B*T*G*D, 1), k.attnRand(B*T*G*D, 1)
		var kf, vf pair
		if s.Wf > 0 {
			kf, vf = k.attnRand(B*T*G*D, 1), k.attnRand(B*T*G*D, 1)
		}
		var selG, selC kernels.IntBuffer
		if s.M > 0 {
			nC := T / s.C
			sel := make([]int32, B*nC*s.S)
			for b := 0; b < B; b++ {
				for ch := 0; ch < nC; ch++ {
					for i := 0; i < s.S; i++ {
						sel[(b*nC+ch)*s.S+i] = int32(ch*s.C + i*s.C/s.S)
					}
				}
			}
			selG, selC = k.gpu.AllocInt(len(sel)), k.cpu.AllocInt(len(sel))
			k.gpu.UploadInt(selG, sel)
			k.cpu.UploadInt(selC, sel)
		}
		out, lse := k.zeros(B*T*H*D), k.zeros(B*T*H)
		opt := func(p func(pair) kernels.Buffer, x pair) kernels.Buffer {
			if x.g == nil {
				return nil
			}
			return p(x)
		}
		fwd := func(onGPU bool) {
			be, p := k.pick(onGPU)
			sel := selC
			if onGPU {
				sel = selG
			}
			var qm, km kernels.Buffer
			if s.M > 0 {
				qm, km = p(q), p(kk)
			}
			be.Attention(p(out), p(lse), p(q), p(kk), p(v), opt(p, kf), opt(p, vf), qm, km, sel, s)
		}
		keys := float64(min(T, c.Window) + s.Wf + s.M)
		flops := 4 * float64(B*T*H*D) * keys
		shape := fmt.Sprintf("%d×%d×%d×%d", B, T, H, D)
		if !backward {
			return fwd, []pair{out, lse}, flops, 0, shape
		}
		fwd(true)
		fwd(false)
		dout := k.attnRand(B*T*H*D, 1)
		dq, dk, dv := k.zeros(B*T*H*D), k.zeros(B*T*G*D), k.zeros(B*T*G*D)
		var dkf, dvf pair
		if s.Wf > 0 {
			dkf, dvf = k.zeros(B*T*G*D), k.zeros(B*T*G*D)
		}
		return func(onGPU bool) {
			be, p := k.pick(onGPU)
			sel := selC
			if onGPU {
				sel = selG
			}
			var qm, km, dqm, dkm kernels.Buffer
			if s.M > 0 {
				qm, km, dqm, dkm = p(q), p(kk), p(dq), p(dk)
			}
			be.AttentionBackward(p(dq), p(dk), p(dv), opt(p, dkf), opt(p, dvf), dqm, dkm, p(dout), p(out), p(lse),
				p(q), p(kk), p(v), opt(p, kf), opt(p, vf), qm, km, sel, s)
		}, []pair{dq, dk, dv}, 2.5 * flops, 0, shape
	}}
}

// writeJSON writes v, indented, to path (the benchmarks' --json); an empty
// path writes nothing.
func writeJSON(path string, v any) error {
	if path == "" {
		return nil
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
