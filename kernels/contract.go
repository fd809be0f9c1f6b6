package kernels

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// The argument contract of every op, declared once. Each Op below lists the
// buffer arguments of one Backend method in the method's order, the length
// each must have as a product of the method's dimensions, what the op does
// with it and whether it may be nil. Both backends check every call with
// Op.Check before they touch a buffer, and the conformance suite
// (kerneltest) fails for an op here that has no test or no tolerance row.
// Adding an op means: its method in Backend, its entry here, its test and
// tolerance row in kerneltest, and the two implementations.

// Dir says what an op does with a buffer argument.
type Dir uint8

const (
	// In is only read.
	In Dir = iota + 1
	// Out is written whole (MatMul adds to it when asked to).
	Out
	// Grad is accumulated into (+=), the backward convention.
	Grad
	// InOut is read and written in place: AdamW's parameter and moments,
	// Scale's x, the columns of CopyColumns' dst that it leaves.
	InOut
)

// String returns the direction's name.
func (d Dir) String() string {
	switch d {
	case In:
		return "in"
	case Out:
		return "out"
	case Grad:
		return "grad"
	case InOut:
		return "inout"
	}
	return fmt.Sprintf("Dir(%d)", uint8(d))
}

// Arg is one buffer argument of an op.
type Arg struct {
	Name string
	// Len is the length the buffer must have: dimension names joined by
	// "·", where a factor may also be a floor quotient such as "(T/C)" or
	// a constant such as "2" (two stacked matrices). A
	// name that is not one of the op's Dims is free ("n", "V"): the length
	// of the first argument that has it fixes it (required arguments before
	// optional ones), and later arguments must agree.
	Len string
	Dir Dir
	// Optional arguments may be nil; the op then skips them.
	Optional bool
	// Int marks an IntBuffer (tokens, targets, selected positions).
	Int bool
	// When, if set, names a dimension that switches the argument on: while
	// it is 0 the argument is unused, it may be anything (nil included),
	// and backends treat it as nil.
	When string
}

// Op is the argument contract of one Backend method.
type Op struct {
	// Name names the op in error messages ("matmul_backward").
	Name string
	// Method is the Backend method ("MatMulBackward").
	Method string
	// Dims are the dimensions the method takes, in the order Check takes
	// their values (its int arguments, or the fields of AttnShape).
	Dims []string
	// Args are its buffer arguments, in the method's order.
	Args []Arg
	// Rule, when set, checks what lengths cannot say about the dimensions
	// (all non-negative by then); it returns what is wrong, or "".
	Rule func(d DimValues) string

	// Set by compile from Dims and Args.
	names []string   // Dims, then the free dimensions
	lens  [][]factor // per argument, the factors of Len
	when  []int      // per argument, the index of When in names, or -1
}

// factor is one factor of a length: the value of names[num], or the floor
// quotient names[num]/names[den] (0 when the divisor is 0) when den >= 0,
// or the constant k when num < 0.
type factor struct{ num, den, k int }

// unknown reports whether f is a dimension whose value is not known yet.
func (f factor) unknown(vals []int) bool { return f.num >= 0 && f.den < 0 && vals[f.num] < 0 }

// DimValues are the dimension values of one call, free ones included, as a
// Rule sees them.
type DimValues struct {
	op   *Op
	vals []int
}

// Of returns the value of the dimension called name; 0 for a name the op
// does not have, or a free dimension no argument fixed.
func (d DimValues) Of(name string) int {
	for i, n := range d.op.names {
		if n == name {
			return max(d.vals[i], 0)
		}
	}
	return 0
}

// Nil is the length Check takes for an absent (nil) argument.
const Nil = -1

// Check validates one call of op. dims holds the values of op.Dims in
// order and lens the lengths of the buffer arguments in the order of
// op.Args, Nil for a nil one. The error starts with the op's name and names
// the argument, the length it needs (as a formula and a number) and the
// length it has.
func (op *Op) Check(dims, lens []int) error {
	if len(dims) != len(op.Dims) || len(lens) != len(op.Args) {
		return fmt.Errorf("%s: checked with %d dimensions and %d buffers, want %d and %d",
			op.Name, len(dims), len(lens), len(op.Dims), len(op.Args))
	}
	for i, v := range dims {
		if v < 0 {
			return fmt.Errorf("%s: negative dimension %s=%d", op.Name, op.Dims[i], v)
		}
	}
	vals := make([]int, len(op.names))
	copy(vals, dims)
	binder := make([]int, len(op.names)) // which argument fixed a free dimension
	for i := range binder {
		binder[i] = -1
		if i >= len(dims) {
			vals[i] = -1 // not known yet
		}
	}
	// Required arguments fix free dimensions first, optional ones after.
	for _, optional := range []bool{false, true} {
		for i, a := range op.Args {
			if a.Optional != optional || lens[i] == Nil || !op.uses(i, vals) {
				continue
			}
			if err := op.bind(i, lens[i], vals, binder); err != nil {
				return err
			}
		}
	}
	if op.Rule != nil {
		if msg := op.Rule(DimValues{op, vals}); msg != "" {
			return fmt.Errorf("%s: %s", op.Name, msg)
		}
	}
	for i, a := range op.Args {
		if !op.uses(i, vals) {
			continue
		}
		if lens[i] == Nil {
			if a.Optional {
				continue
			}
			return fmt.Errorf("%s: %s is nil", op.Name, a.Name)
		}
		want, known := op.length(i, vals)
		if known && lens[i] != want {
			return fmt.Errorf("%s: %s has %d elements, want %s=%d", op.Name, a.Name, lens[i], op.label(i, binder), want)
		}
	}
	return nil
}

// Want returns the length every argument needs in a call with dims (the
// values of op.Dims) when each free dimension is free: what a caller
// allocates. Unused arguments get Nil; a wrong number of dims gives nil.
func (op *Op) Want(dims []int, free int) []int {
	if len(dims) != len(op.Dims) {
		return nil
	}
	vals := append(append([]int(nil), dims...), make([]int, len(op.names)-len(dims))...)
	for i := len(dims); i < len(vals); i++ {
		vals[i] = free
	}
	lens := make([]int, len(op.Args))
	for i := range op.Args {
		lens[i] = Nil
		if op.uses(i, vals) {
			lens[i], _ = op.length(i, vals)
		}
	}
	return lens
}

// Uses reports whether a call with dims (the values of op.Dims) uses
// argument i: false when the argument's When dimension is 0.
func (op *Op) Uses(i int, dims []int) bool { return op.uses(i, dims) }

func (op *Op) uses(i int, vals []int) bool {
	w := op.when[i]
	return w < 0 || vals[w] > 0
}

// bind fixes the one free dimension of argument i's length that is not
// known yet from the argument's length n, if the other factors allow it.
func (op *Op) bind(i, n int, vals, binder []int) error {
	free, rest := -1, 1
	for _, f := range op.lens[i] {
		switch {
		case f.unknown(vals) && free < 0:
			free = f.num
		case f.unknown(vals):
			return nil // two unknowns: a later argument may fix one
		default:
			rest *= f.value(vals)
		}
	}
	if free < 0 || rest == 0 {
		return nil // nothing to fix, or any length fits
	}
	if n%rest != 0 {
		a := op.Args[i]
		others := slices.DeleteFunc(strings.Split(a.Len, "·"), func(s string) bool { return s == op.names[free] })
		return fmt.Errorf("%s: %s has %d elements, not a multiple of %s=%d", op.Name, a.Name, n, strings.Join(others, "·"), rest)
	}
	vals[free], binder[free] = n/rest, i
	return nil
}

// length returns the length argument i needs, and false when a free
// dimension of it is still unknown (any length fits then).
func (op *Op) length(i int, vals []int) (int, bool) {
	n := 1
	for _, f := range op.lens[i] {
		if f.unknown(vals) {
			return 0, false
		}
		n *= f.value(vals)
	}
	return n, true
}

func (f factor) value(vals []int) int {
	if f.num < 0 {
		return f.k
	}
	if f.den < 0 {
		return vals[f.num]
	}
	if vals[f.den] == 0 {
		return 0
	}
	return vals[f.num] / vals[f.den]
}

// label is argument i's Len for an error message; a length that is one free
// dimension fixed by another argument reads "len(that argument)".
func (op *Op) label(i int, binder []int) string {
	if l := op.lens[i]; len(l) == 1 && l[0].num >= 0 && l[0].den < 0 {
		if b := binder[l[0].num]; b >= 0 && b != i {
			return "len(" + op.Args[b].Name + ")"
		}
	}
	return op.Args[i].Len
}

// compile resolves op's lengths into factors. A malformed entry is a bug in
// this file, reported when the package loads.
func (op *Op) compile() error {
	op.names = append([]string(nil), op.Dims...)
	index := func(name string, free bool) int {
		for i, n := range op.names {
			if n == name {
				return i
			}
		}
		if !free {
			return -1
		}
		op.names = append(op.names, name)
		return len(op.names) - 1
	}
	op.lens, op.when = make([][]factor, len(op.Args)), make([]int, len(op.Args))
	for i, a := range op.Args {
		if a.Name == "" || a.Len == "" || a.Dir < In || a.Dir > InOut {
			return fmt.Errorf("kernels: contract of %s: argument %d (%q) needs a name, a length and a direction", op.Method, i, a.Name)
		}
		for _, s := range strings.Split(a.Len, "·") {
			f := factor{den: -1}
			if k, err := strconv.Atoi(s); err == nil && k >= 0 {
				f.num, f.k = -1, k
			} else if num, den, ok := strings.Cut(strings.TrimSuffix(strings.TrimPrefix(s, "("), ")"), "/"); ok {
				f.num, f.den = index(num, false), index(den, false)
				if f.num < 0 || f.den < 0 || !strings.HasPrefix(s, "(") {
					return fmt.Errorf("kernels: contract of %s: %s's length %q: a quotient must be of two dimensions, in parentheses", op.Method, a.Name, a.Len)
				}
			} else {
				f.num = index(s, true)
			}
			op.lens[i] = append(op.lens[i], f)
		}
		op.when[i] = -1
		if a.When != "" {
			if op.when[i] = index(a.When, false); op.when[i] < 0 {
				return fmt.Errorf("kernels: contract of %s: %s's When %q is not a dimension", op.Method, a.Name, a.When)
			}
		}
	}
	return nil
}

func init() {
	for _, op := range Contract {
		if err := op.compile(); err != nil {
			panic(err)
		}
	}
}

// Dims returns the values of the attention ops' dimensions (OpAttention.Dims).
func (s AttnShape) Dims() []int {
	return []int{s.B, s.T, s.H, s.G, s.D, s.Wc, s.Wf, s.C, s.S, s.M, s.Delta}
}

// Contract is every op, in the order of the Backend interface.
var Contract = []*Op{
	OpSlice, OpUpload, OpDownload, OpUploadInt, OpDownloadInt,
	OpZero, OpCopy, OpCopyColumns, OpAccumulate, OpScale, OpSumSquares,
	OpEmbedding, OpEmbeddingBackward, OpRMSNorm, OpRMSNormBackward,
	OpMatMul, OpMatMulAdd, OpMatMulBackward, OpConv1d, OpConv1dBackward, OpConv1dSiLU,
	OpSiLU, OpSiLUBackward, OpSiLUMatMulBackward,
	OpSelectiveScan, OpSelectiveScanBackward, OpRoPE, OpRoPEBackward,
	OpAttention, OpAttentionBackward, OpShiftRows, OpInnovation, OpInnovationBackward,
	OpSelectChunks, OpSwiGLU, OpSwiGLUBackward, OpSwiGLUPacked, OpSwiGLUPackedBackward,
	OpCrossEntropy, OpCrossEntropyBackward,
	OpAdamWStep, OpAdamWSteps,
}

// Buffers, copies and reductions. "n" is a free dimension: the buffers'
// common length.
var (
	OpSlice = &Op{Name: "slice", Method: "Slice", Dims: []string{"off", "n"},
		Args: []Arg{{Name: "b", Len: "len(b)", Dir: In}},
		Rule: func(d DimValues) string {
			if off, n, m := d.Of("off"), d.Of("n"), d.Of("len(b)"); off+n > m {
				return fmt.Sprintf("[%d, %d+%d) is outside a buffer of %d", off, off, n, m)
			}
			return ""
		}}
	OpUpload = &Op{Name: "upload", Method: "Upload", Dims: []string{"len(src)"},
		Args: []Arg{{Name: "dst", Len: "len(src)", Dir: Out}}}
	OpDownload = &Op{Name: "download", Method: "Download", Dims: []string{"len(dst)"},
		Args: []Arg{{Name: "src", Len: "len(dst)", Dir: In}}}
	OpUploadInt = &Op{Name: "upload_int", Method: "UploadInt", Dims: []string{"len(src)"},
		Args: []Arg{{Name: "dst", Len: "len(src)", Dir: Out, Int: true}}}
	OpDownloadInt = &Op{Name: "download_int", Method: "DownloadInt", Dims: []string{"len(dst)"},
		Args: []Arg{{Name: "src", Len: "len(dst)", Dir: In, Int: true}}}
	OpZero = &Op{Name: "zero", Method: "Zero",
		Args: []Arg{{Name: "x", Len: "n", Dir: Out}}}
	OpCopy = &Op{Name: "copy", Method: "Copy",
		Args: []Arg{{Name: "dst", Len: "n", Dir: Out}, {Name: "src", Len: "n", Dir: In}}}
	OpCopyColumns = &Op{Name: "copy_columns", Method: "CopyColumns", Dims: []string{"Rw", "n", "dCols", "dc", "sCols", "sc"},
		Args: []Arg{{Name: "dst", Len: "Rw·dCols", Dir: InOut}, {Name: "src", Len: "Rw·sCols", Dir: In}},
		Rule: func(d DimValues) string {
			n := d.Of("n")
			if dc, dCols := d.Of("dc"), d.Of("dCols"); dc+n > dCols {
				return fmt.Sprintf("dst columns [%d,%d) are outside its %d", dc, dc+n, dCols)
			}
			if sc, sCols := d.Of("sc"), d.Of("sCols"); sc+n > sCols {
				return fmt.Sprintf("src columns [%d,%d) are outside its %d", sc, sc+n, sCols)
			}
			return ""
		}}
	OpAccumulate = &Op{Name: "accumulate", Method: "Accumulate",
		Args: []Arg{{Name: "dst", Len: "n", Dir: Grad}, {Name: "src", Len: "n", Dir: In}}}
	OpScale = &Op{Name: "scale", Method: "Scale",
		Args: []Arg{{Name: "x", Len: "n", Dir: InOut}}}
	OpSumSquares = &Op{Name: "sum_squares", Method: "SumSquares",
		Args: []Arg{{Name: "x", Len: "n", Dir: In}}}
)

// Embedding, normalisation, products and the small ops. V, the vocabulary,
// is free: the table's length fixes it.
var (
	OpEmbedding = &Op{Name: "embedding", Method: "Embedding", Dims: []string{"Rw", "d"},
		Args: []Arg{
			{Name: "out", Len: "Rw·d", Dir: Out},
			{Name: "table", Len: "V·d", Dir: In},
			{Name: "tokens", Len: "Rw", Dir: In, Int: true},
		}}
	OpEmbeddingBackward = &Op{Name: "embedding_backward", Method: "EmbeddingBackward", Dims: []string{"Rw", "d"},
		Args: []Arg{
			{Name: "dtable", Len: "V·d", Dir: Grad, Optional: true},
			{Name: "dout", Len: "Rw·d", Dir: In},
			{Name: "tokens", Len: "Rw", Dir: In, Int: true},
		}}
	OpRMSNorm = &Op{Name: "rmsnorm", Method: "RMSNorm", Dims: []string{"Rw", "d"},
		Args: []Arg{
			{Name: "out", Len: "Rw·d", Dir: Out},
			{Name: "rstd", Len: "Rw", Dir: Out},
			{Name: "x", Len: "Rw·d", Dir: In},
			{Name: "g", Len: "d", Dir: In},
		}}
	OpRMSNormBackward = &Op{Name: "rmsnorm_backward", Method: "RMSNormBackward", Dims: []string{"Rw", "d"},
		Args: []Arg{
			{Name: "dx", Len: "Rw·d", Dir: Grad, Optional: true},
			{Name: "dg", Len: "d", Dir: Grad, Optional: true},
			{Name: "dout", Len: "Rw·d", Dir: In},
			{Name: "x", Len: "Rw·d", Dir: In},
			{Name: "g", Len: "d", Dir: In},
			{Name: "rstd", Len: "Rw", Dir: In},
		}}
	OpMatMul = &Op{Name: "matmul", Method: "MatMul", Dims: []string{"Rw", "N", "K"},
		Args: []Arg{
			{Name: "out", Len: "Rw·N", Dir: Out},
			{Name: "x", Len: "Rw·K", Dir: In},
			{Name: "w", Len: "N·K", Dir: In},
		}}
	OpMatMulAdd = &Op{Name: "matmul_add", Method: "MatMulAdd", Dims: []string{"Rw", "N", "K"},
		Args: []Arg{
			{Name: "out", Len: "Rw·N", Dir: Out},
			{Name: "r", Len: "Rw·N", Dir: In},
			{Name: "x", Len: "Rw·K", Dir: In},
			{Name: "w", Len: "N·K", Dir: In},
		}}
	OpMatMulBackward = &Op{Name: "matmul_backward", Method: "MatMulBackward", Dims: []string{"Rw", "N", "K"},
		Args: []Arg{
			{Name: "dx", Len: "Rw·K", Dir: Grad, Optional: true},
			{Name: "dw", Len: "N·K", Dir: Grad, Optional: true},
			{Name: "dout", Len: "Rw·N", Dir: In},
			{Name: "x", Len: "Rw·K", Dir: In},
			{Name: "w", Len: "N·K", Dir: In},
		}}
	OpConv1d = &Op{Name: "conv1d", Method: "Conv1d", Dims: []string{"B", "T", "E", "K"},
		Args: []Arg{
			{Name: "out", Len: "B·T·E", Dir: Out},
			{Name: "x", Len: "B·T·E", Dir: In},
			{Name: "w", Len: "E·K", Dir: In},
			{Name: "bias", Len: "E", Dir: In},
		}}
	OpConv1dBackward = &Op{Name: "conv1d_backward", Method: "Conv1dBackward", Dims: []string{"B", "T", "E", "K"},
		Args: []Arg{
			{Name: "dx", Len: "B·T·E", Dir: Grad, Optional: true},
			{Name: "dw", Len: "E·K", Dir: Grad, Optional: true},
			{Name: "dbias", Len: "E", Dir: Grad, Optional: true},
			{Name: "dout", Len: "B·T·E", Dir: In},
			{Name: "x", Len: "B·T·E", Dir: In},
			{Name: "w", Len: "E·K", Dir: In},
		}}
	OpConv1dSiLU = &Op{Name: "conv1d_silu", Method: "Conv1dSiLU", Dims: []string{"B", "T", "E", "K"},
		Args: []Arg{
			{Name: "out", Len: "B·T·E", Dir: Out},
			{Name: "act", Len: "B·T·E", Dir: Out},
			{Name: "x", Len: "B·T·E", Dir: In},
			{Name: "w", Len: "E·K", Dir: In},
			{Name: "bias", Len: "E", Dir: In},
		}}
	OpSiLU = &Op{Name: "silu", Method: "SiLU",
		Args: []Arg{{Name: "out", Len: "n", Dir: Out}, {Name: "x", Len: "n", Dir: In}}}
	OpSiLUBackward = &Op{Name: "silu_backward", Method: "SiLUBackward",
		Args: []Arg{
			{Name: "dx", Len: "n", Dir: Grad, Optional: true},
			{Name: "dout", Len: "n", Dir: In},
			{Name: "x", Len: "n", Dir: In},
		}}
	OpSiLUMatMulBackward = &Op{Name: "silu_matmul_backward", Method: "SiLUMatMulBackward", Dims: []string{"Rw", "N", "K"},
		Args: []Arg{
			{Name: "dx", Len: "Rw·K", Dir: Grad, Optional: true},
			{Name: "dr", Len: "Rw·K", Dir: In},
			{Name: "dout", Len: "Rw·N", Dir: In},
			{Name: "w", Len: "N·K", Dir: In},
			{Name: "x", Len: "Rw·K", Dir: In},
		}}
	OpShiftRows = &Op{Name: "shift_rows", Method: "ShiftRows", Dims: []string{"B", "T", "d"},
		Args: []Arg{{Name: "out", Len: "B·T·d", Dir: Out}, {Name: "x", Len: "B·T·d", Dir: In}}}
	OpInnovation = &Op{Name: "innovation", Method: "Innovation", Dims: []string{"Rw", "d"},
		Args: []Arg{
			{Name: "e", Len: "Rw", Dir: Out},
			{Name: "u", Len: "Rw·d", Dir: In},
			{Name: "p", Len: "Rw·d", Dir: In},
		},
		Rule: positiveWidth}
	OpInnovationBackward = &Op{Name: "innovation_backward", Method: "InnovationBackward", Dims: []string{"Rw", "d"},
		Args: []Arg{
			{Name: "dp", Len: "Rw·d", Dir: Grad, Optional: true},
			{Name: "de", Len: "Rw", Dir: In},
			{Name: "u", Len: "Rw·d", Dir: In},
			{Name: "p", Len: "Rw·d", Dir: In},
		},
		Rule: positiveWidth}
	OpSelectChunks = &Op{Name: "select_chunks", Method: "SelectChunks", Dims: []string{"B", "T", "C", "S"},
		Args: []Arg{
			{Name: "sel", Len: "B·(T/C)·S", Dir: Out, Int: true},
			{Name: "e", Len: "B·T", Dir: In},
		},
		Rule: func(d DimValues) string {
			if C, S := d.Of("C"), d.Of("S"); C == 0 {
				return "chunk length C=0, want > 0"
			} else if S > C {
				return fmt.Sprintf("S=%d selected per chunk exceeds chunk length C=%d", S, C)
			}
			return ""
		}}
	OpSwiGLU = &Op{Name: "swiglu", Method: "SwiGLU",
		Args: []Arg{
			{Name: "h", Len: "n", Dir: Out},
			{Name: "gate", Len: "n", Dir: In},
			{Name: "up", Len: "n", Dir: In},
		}}
	OpSwiGLUBackward = &Op{Name: "swiglu_backward", Method: "SwiGLUBackward",
		Args: []Arg{
			{Name: "dgate", Len: "n", Dir: Grad, Optional: true},
			{Name: "dup", Len: "n", Dir: Grad, Optional: true},
			{Name: "dh", Len: "n", Dir: In},
			{Name: "gate", Len: "n", Dir: In},
			{Name: "up", Len: "n", Dir: In},
		}}
	OpSwiGLUPacked = &Op{Name: "swiglu_packed", Method: "SwiGLUPacked", Dims: []string{"Rw", "F"},
		Args: []Arg{
			{Name: "h", Len: "Rw·F", Dir: Out},
			{Name: "gu", Len: "Rw·2·F", Dir: In},
		}}
	OpSwiGLUPackedBackward = &Op{Name: "swiglu_packed_backward", Method: "SwiGLUPackedBackward", Dims: []string{"Rw", "F"},
		Args: []Arg{
			{Name: "dgu", Len: "Rw·2·F", Dir: Grad, Optional: true},
			{Name: "dh", Len: "Rw·F", Dir: In},
			{Name: "gu", Len: "Rw·2·F", Dir: In},
		}}
	OpCrossEntropy = &Op{Name: "cross_entropy", Method: "CrossEntropy", Dims: []string{"Rw", "V"},
		Args: []Arg{
			{Name: "loss", Len: "Rw", Dir: Out},
			{Name: "logits", Len: "Rw·V", Dir: In},
			{Name: "targets", Len: "Rw", Dir: In, Int: true},
		}}
	OpCrossEntropyBackward = &Op{Name: "cross_entropy_backward", Method: "CrossEntropyBackward", Dims: []string{"Rw", "V"},
		Args: []Arg{
			{Name: "dlogits", Len: "Rw·V", Dir: Grad, Optional: true},
			{Name: "logits", Len: "Rw·V", Dir: In},
			{Name: "targets", Len: "Rw", Dir: In, Int: true},
		}}
	// OpAdamWStep's one dimension is AdamW.Step.
	OpAdamWStep = &Op{Name: "adamw", Method: "AdamWStep", Dims: []string{"Step"},
		Args: []Arg{
			{Name: "param", Len: "n", Dir: InOut},
			{Name: "grad", Len: "n", Dir: In},
			{Name: "m", Len: "n", Dir: InOut},
			{Name: "v", Len: "n", Dir: InOut},
		},
		Rule: adamWStep}
	// OpAdamWSteps is OpAdamWStep over the whole flat buffers; its segments
	// are checked by CheckSegments.
	OpAdamWSteps = &Op{Name: "adamw_steps", Method: "AdamWSteps", Dims: []string{"Step"},
		Args: []Arg{
			{Name: "param", Len: "n", Dir: InOut},
			{Name: "grad", Len: "n", Dir: In},
			{Name: "m", Len: "n", Dir: InOut},
			{Name: "v", Len: "n", Dir: InOut},
		},
		Rule: adamWStep}
)

func adamWStep(d DimValues) string {
	if s := d.Of("Step"); s < 1 {
		return fmt.Sprintf("step=%d, want >= 1 (1-based)", s)
	}
	return ""
}

// CheckSegments checks the segments of AdamWSteps against buffers of n
// elements: each inside them, in ascending order, none overlapping the next.
func CheckSegments(segs []AdamWSegment, n int) error {
	end := 0
	for i, s := range segs {
		switch {
		case s.Off < 0 || s.N < 0 || s.Off > n || s.N > n-s.Off:
			return fmt.Errorf("segment %d [%d, %d+%d) is outside the buffers of %d", i, s.Off, s.Off, s.N, n)
		case s.Off < end:
			return fmt.Errorf("segment %d starts at %d, before the end %d of segment %d (want ascending, not overlapping)", i, s.Off, end, i-1)
		}
		end = s.Off + s.N
	}
	return nil
}

func positiveWidth(d DimValues) string {
	if d.Of("d") == 0 {
		return "d=0, want > 0"
	}
	return ""
}

// The SSM ops.
var (
	OpSelectiveScan = &Op{Name: "selective_scan", Method: "SelectiveScan", Dims: []string{"B", "T", "E", "N"},
		Args: append([]Arg{{Name: "out", Len: "B·T·E", Dir: Out}}, scanInputs...)}
	OpSelectiveScanBackward = &Op{Name: "selective_scan_backward", Method: "SelectiveScanBackward", Dims: []string{"B", "T", "E", "N"},
		Args: append(append(grads(scanInputs), Arg{Name: "dout", Len: "B·T·E", Dir: In}), scanInputs...)}
)

var scanInputs = []Arg{
	{Name: "x", Len: "B·T·E", Dir: In},
	{Name: "dt", Len: "B·T·E", Dir: In},
	{Name: "dtBias", Len: "E", Dir: In},
	{Name: "Alog", Len: "E·N", Dir: In},
	{Name: "Bm", Len: "B·T·N", Dir: In},
	{Name: "Cm", Len: "B·T·N", Dir: In},
	{Name: "Dskip", Len: "E", Dir: In},
	{Name: "z", Len: "B·T·E", Dir: In},
}

// grads returns the optional gradient arguments of inputs: "d" and the
// input's name, its length and When, accumulated into.
func grads(inputs []Arg) []Arg {
	var g []Arg
	for _, a := range inputs {
		if a.Int {
			continue
		}
		g = append(g, Arg{Name: "d" + a.Name, Len: a.Len, Dir: Grad, Optional: true, When: a.When})
	}
	return g
}

// RoPE and attention. Attention's dimensions are AttnShape's fields
// (AttnShape.Dims).
var (
	OpRoPE = &Op{Name: "rope", Method: "RoPE", Dims: []string{"B", "T", "nh", "D"},
		Args: []Arg{{Name: "out", Len: "B·T·nh·D", Dir: Out}, {Name: "x", Len: "B·T·nh·D", Dir: In}},
		Rule: evenHeadWidth}
	OpRoPEBackward = &Op{Name: "rope_backward", Method: "RoPEBackward", Dims: []string{"B", "T", "nh", "D"},
		Args: []Arg{{Name: "dx", Len: "B·T·nh·D", Dir: Grad, Optional: true}, {Name: "dout", Len: "B·T·nh·D", Dir: In}},
		Rule: evenHeadWidth}
	OpAttention = &Op{Name: "attention", Method: "Attention", Dims: attnDims,
		Args: append([]Arg{
			{Name: "out", Len: "B·T·H·D", Dir: Out},
			{Name: "lse", Len: "B·T·H", Dir: Out},
		}, attnInputs...),
		Rule: attnRule}
	OpAttentionBackward = &Op{Name: "attention_backward", Method: "AttentionBackward", Dims: attnDims,
		Args: append(append(grads(attnInputs), []Arg{
			{Name: "dout", Len: "B·T·H·D", Dir: In},
			{Name: "out", Len: "B·T·H·D", Dir: In},
			{Name: "lse", Len: "B·T·H", Dir: In},
		}...), attnInputs...),
		Rule: attnRule}
)

var attnDims = []string{"B", "T", "H", "G", "D", "Wc", "Wf", "C", "S", "M", "Delta"}

var attnInputs = []Arg{
	{Name: "q", Len: "B·T·H·D", Dir: In},
	{Name: "k", Len: "B·T·G·D", Dir: In},
	{Name: "v", Len: "B·T·G·D", Dir: In},
	{Name: "kf", Len: "B·T·G·D", Dir: In, When: "Wf"},
	{Name: "vf", Len: "B·T·G·D", Dir: In, When: "Wf"},
	{Name: "qm", Len: "B·T·H·D", Dir: In, When: "M"},
	{Name: "km", Len: "B·T·G·D", Dir: In, When: "M"},
	{Name: "sel", Len: "B·(T/C)·S", Dir: In, Int: true, When: "M"},
}

func evenHeadWidth(d DimValues) string {
	if D := d.Of("D"); D%2 != 0 {
		return fmt.Sprintf("head width D=%d is odd", D)
	}
	return ""
}

func attnRule(d DimValues) string {
	H, G, D, C, M := d.Of("H"), d.Of("G"), d.Of("D"), d.Of("C"), d.Of("M")
	switch {
	case H < 1 || G < 1 || G > H:
		return fmt.Sprintf("heads H=%d, G=%d: want 1 <= G <= H", H, G)
	case D < 1:
		return fmt.Sprintf("head width D=%d, want >= 1", D)
	case d.Of("Wc") < 1:
		return fmt.Sprintf("context window Wc=%d, want >= 1", d.Of("Wc"))
	case M > 0 && C < 1:
		return fmt.Sprintf("chunk length C=%d, want >= 1 when M=%d > 0", C, M)
	}
	return ""
}
