package kernels

import (
	"reflect"
	"strings"
	"testing"
)

// TestContractMatchesBackend holds the contract to the interface: one entry
// per method that takes buffers, whose arguments are that method's buffer
// parameters in order and kind, and whose dimensions are its int
// parameters (where it has any).
func TestContractMatchesBackend(t *testing.T) {
	iface := reflect.TypeFor[Backend[float32]]()
	bufT, intT := reflect.TypeFor[Buffer](), reflect.TypeFor[IntBuffer]()
	byMethod, byName := map[string]*Op{}, map[string]bool{}
	for _, op := range Contract {
		if byMethod[op.Method] != nil || byName[op.Name] {
			t.Errorf("%s (%s) is in the contract twice", op.Method, op.Name)
		}
		byMethod[op.Method], byName[op.Name] = op, true
	}
	for i := range iface.NumMethod() {
		m := iface.Method(i)
		var bufs []reflect.Type
		ints := 0
		for j := range m.Type.NumIn() {
			switch p := m.Type.In(j); {
			case p == bufT || p == intT:
				bufs = append(bufs, p)
			case p.Kind() == reflect.Int:
				ints++
			}
		}
		op := byMethod[m.Name]
		delete(byMethod, m.Name)
		if len(bufs) == 0 {
			if op != nil {
				t.Errorf("%s takes no buffer but has a contract entry", m.Name)
			}
			continue
		}
		if op == nil {
			t.Errorf("%s takes buffers but has no entry in Contract", m.Name)
			continue
		}
		if len(op.Args) != len(bufs) {
			t.Errorf("%s: the contract lists %d buffers, the method takes %d", m.Name, len(op.Args), len(bufs))
			continue
		}
		for j, a := range op.Args {
			if a.Int != (bufs[j] == intT) {
				t.Errorf("%s: argument %d (%s): Int is %v, the method takes a %v", m.Name, j, a.Name, a.Int, bufs[j])
			}
		}
		if ints > 0 && ints != len(op.Dims) {
			t.Errorf("%s: the contract lists %d dimensions, the method takes %d ints", m.Name, len(op.Dims), ints)
		}
	}
	for name := range byMethod {
		t.Errorf("the contract has %s, which Backend does not", name)
	}
}

func TestAttnShapeDims(t *testing.T) {
	s := AttnShape{B: 1, T: 2, H: 3, G: 4, D: 5, Wc: 6, Wf: 7, C: 8, S: 9, M: 10, Delta: 11}
	d := DimValues{OpAttention, s.Dims()}
	got := []int{d.Of("B"), d.Of("T"), d.Of("H"), d.Of("G"), d.Of("D"), d.Of("Wc"), d.Of("Wf"), d.Of("C"), d.Of("S"), d.Of("M"), d.Of("Delta")}
	if !reflect.DeepEqual(got, s.Dims()) {
		t.Errorf("AttnShape.Dims in OpAttention's names: %v, want %v", got, s.Dims())
	}
}

func TestCheck(t *testing.T) {
	attn := AttnShape{B: 1, T: 4, H: 2, G: 1, D: 2, Wc: 2, C: 2, S: 1, M: 1, Delta: 1}
	nq, nk := 16, 8
	cases := []struct {
		name string
		op   *Op
		dims []int
		lens []int
		want string // "" for no error
	}{
		{"ok", OpMatMul, []int{2, 3, 4}, []int{6, 8, 12}, ""},
		{"short", OpMatMul, []int{2, 3, 4}, []int{6, 7, 12}, "matmul: x has 7 elements, want Rw·K=8"},
		{"nil", OpMatMul, []int{2, 3, 4}, []int{6, 8, Nil}, "matmul: w is nil"},
		{"optional_nil", OpMatMulBackward, []int{2, 3, 4}, []int{Nil, Nil, 6, 8, 12}, ""},
		{"optional_short", OpMatMulBackward, []int{2, 3, 4}, []int{Nil, 11, 6, 8, 12}, "matmul_backward: dw has 11 elements, want N·K=12"},
		{"negative", OpRMSNorm, []int{-2, 2}, []int{4, 2, 4, 2}, "rmsnorm: negative dimension Rw=-2"},
		{"free_from_first", OpCopy, nil, []int{3, 4}, "copy: src has 4 elements, want len(dst)=3"},
		{"free_from_required", OpSiLUBackward, nil, []int{5, 4, 4}, "silu_backward: dx has 5 elements, want len(dout)=4"},
		{"free_any", OpZero, nil, []int{17}, ""},
		{"free_product", OpEmbedding, []int{3, 2}, []int{6, 10, 3}, ""},
		{"free_not_multiple", OpEmbedding, []int{3, 2}, []int{6, 7, 3}, "embedding: table has 7 elements, not a multiple of d=2"},
		{"quotient", OpSelectChunks, []int{2, 7, 3, 2}, []int{8, 14}, ""},
		{"quotient_short", OpSelectChunks, []int{2, 7, 3, 2}, []int{7, 14}, "select_chunks: sel has 7 elements, want B·(T/C)·S=8"},
		{"rule", OpSelectChunks, []int{1, 4, 2, 3}, []int{4, 4}, "select_chunks: S=3 selected per chunk exceeds chunk length C=2"},
		{"rule_free", OpSlice, []int{3, 2}, []int{4}, "slice: [3, 3+2) is outside a buffer of 4"},
		{"when_off", OpAttention, attn.Dims(), []int{nq, 8, nq, nk, nk, Nil, 99, nq, nk, 2}, ""},
		{"when_on", OpAttention, AttnShape{B: 1, T: 4, H: 2, G: 1, D: 2, Wc: 2, Wf: 1}.Dims(),
			[]int{nq, 8, nq, nk, nk, Nil, Nil, Nil, Nil, Nil}, "attention: kf is nil"},
		{"when_memory_off", OpAttention, AttnShape{B: 1, T: 4, H: 2, G: 1, D: 2, Wc: 2}.Dims(),
			[]int{nq, 8, nq, nk, nk, Nil, Nil, Nil, Nil, Nil}, ""},
		{"attention_rule", OpAttention, AttnShape{B: 1, T: 2, H: 1, G: 1, D: 0, Wc: 1}.Dims(),
			[]int{0, 2, 0, 0, 0, Nil, Nil, Nil, Nil, Nil}, "attention: head width D=0, want >= 1"},
		{"constant", OpSwiGLUPacked, []int{3, 4}, []int{12, 24}, ""},
		{"constant_short", OpSwiGLUPacked, []int{3, 4}, []int{12, 23}, "swiglu_packed: gu has 23 elements, want Rw·2·F=24"},
		{"wrong_arity", OpMatMul, []int{2, 3}, []int{6, 8, 12}, "matmul: checked with 2 dimensions and 3 buffers, want 3 and 3"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.op.Check(c.dims, c.lens)
			switch {
			case c.want == "" && err != nil:
				t.Errorf("unexpected error: %v", err)
			case c.want != "" && err == nil:
				t.Errorf("no error, want %q", c.want)
			case c.want != "" && err.Error() != c.want:
				t.Errorf("error %q, want %q", err, c.want)
			}
		})
	}
}

func TestCheckSegments(t *testing.T) {
	cases := []struct {
		name string
		segs []AdamWSegment
		want string // "" for no error
	}{
		{"none", nil, ""},
		{"cover", []AdamWSegment{{0, 4, 0.1}, {4, 6, 0}}, ""},
		{"gaps_and_empty", []AdamWSegment{{0, 0, 0}, {0, 2, 0}, {5, 0, 0}, {7, 3, 0.1}}, ""},
		{"past_end", []AdamWSegment{{8, 3, 0}}, "segment 0 [8, 8+3) is outside the buffers of 10"},
		{"negative", []AdamWSegment{{-1, 2, 0}}, "segment 0 [-1, -1+2) is outside the buffers of 10"},
		{"overlap", []AdamWSegment{{0, 5, 0}, {4, 2, 0}}, "segment 1 starts at 4, before the end 5 of segment 0 (want ascending, not overlapping)"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := CheckSegments(c.segs, 10)
			switch {
			case c.want == "" && err != nil:
				t.Errorf("unexpected error: %v", err)
			case c.want != "" && (err == nil || err.Error() != c.want):
				t.Errorf("error %v, want %q", err, c.want)
			}
		})
	}
}

// TestContractDirections pins the conventions the CUDA backend's
// bookkeeping relies on: every gradient argument is optional (but
// Accumulate's dst), and a backward op's argument named d<x> for an input x
// (dout aside: the gradient it starts from) is a gradient.
func TestContractDirections(t *testing.T) {
	for _, op := range Contract {
		inputs := map[string]bool{}
		for _, a := range op.Args {
			if a.Dir == In {
				inputs[a.Name] = true
			}
		}
		for _, a := range op.Args {
			if a.Dir == Grad && a.Optional != (op.Method != "Accumulate") {
				t.Errorf("%s: gradient %s: Optional is %v", op.Method, a.Name, a.Optional)
			}
			if strings.HasSuffix(op.Method, "Backward") && a.Name != "dout" && strings.HasPrefix(a.Name, "d") && inputs[a.Name[1:]] && a.Dir != Grad {
				t.Errorf("%s: %s is the gradient of input %s but its direction is %v", op.Method, a.Name, a.Name[1:], a.Dir)
			}
		}
	}
}
