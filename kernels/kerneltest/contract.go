package kerneltest

import (
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/bmojo/bmojo/kernels"
)

// contractDims are the dimensions of the Contract subtest's calls that are
// not 3: where 3 everywhere breaks an op's Rule.
var contractDims = map[string]map[string]int{
	"Slice":        {"off": 1, "n": 1},
	"CopyColumns":  {"n": 1, "dc": 1, "sc": 2},
	"RoPE":         {"D": 4},
	"RoPEBackward": {"D": 4},
}

// runContract checks, op by op, that the backend holds every argument to
// kernels.Contract: a call with the lengths the contract wants (every
// dimension 3, zeroed buffers) records no error, and a call with one
// argument a float longer, or nil, records exactly the error the
// contract's own Check gives (none where the contract allows it).
func runContract[F kernels.Float](t *testing.T, newBackend func() kernels.Backend[F]) {
	for _, op := range kernels.Contract {
		t.Run(op.Method, func(t *testing.T) {
			dims := make([]int, len(op.Dims))
			for i, name := range op.Dims {
				dims[i] = 3
				if v, ok := contractDims[op.Method][name]; ok {
					dims[i] = v
				}
			}
			try := func(what string, lens []int) {
				t.Helper()
				be := newBackend()
				if err := call(be, op, dims, lens); err != nil {
					t.Fatal(err)
				}
				got, want := be.Err(), op.Check(dims, lens)
				switch {
				case want == nil && got != nil:
					t.Errorf("%s: %v", what, got)
				case want != nil && got == nil:
					t.Errorf("%s: no error recorded, want %q", what, want)
				case want != nil && !strings.Contains(got.Error(), want.Error()):
					t.Errorf("%s: error %q, want the contract's %q", what, got, want)
				}
			}
			lens := op.Want(dims, 3)
			try("the lengths the contract wants", lens)
			for i, a := range op.Args {
				if lens[i] == kernels.Nil {
					continue
				}
				bad := slices.Clone(lens)
				bad[i]++
				try(a.Name+" one longer", bad)
				bad[i] = kernels.Nil
				try(a.Name+" nil", bad)
			}
		})
	}
}

// call calls op's method on be: buffer arguments of lens elements (zeros;
// nil for kernels.Nil), the int arguments from dims, an AttnShape or an
// AdamW built from dims, host slices of dims[0] elements (Upload,
// Download) and 1 or false for the rest.
func call[F kernels.Float](be kernels.Backend[F], op *kernels.Op, dims, lens []int) error {
	m := reflect.ValueOf(be).MethodByName(op.Method)
	if !m.IsValid() {
		return fmt.Errorf("the backend has no method %s", op.Method)
	}
	var (
		bufT, intT = reflect.TypeFor[kernels.Buffer](), reflect.TypeFor[kernels.IntBuffer]()
		attnT      = reflect.TypeFor[kernels.AttnShape]()
		in         []reflect.Value
		nb, nd     int
	)
	for j := range m.Type().NumIn() {
		p := m.Type().In(j)
		v := reflect.Zero(p)
		switch {
		case p == bufT || p == intT:
			if nb == len(lens) {
				return fmt.Errorf("%s: the method takes more buffers than the contract's %d", op.Method, len(lens))
			}
			switch n := lens[nb]; {
			case n == kernels.Nil:
			case p == bufT:
				v = reflect.ValueOf(be.Alloc(n))
			default:
				v = reflect.ValueOf(be.AllocInt(n))
			}
			nb++
		case p.Kind() == reflect.Int:
			v = reflect.ValueOf(dims[nd])
			nd++
		case p == attnT:
			v = reflect.New(p).Elem()
			for i, name := range op.Dims {
				v.FieldByName(name).SetInt(int64(dims[i]))
			}
		case p == reflect.TypeFor[kernels.AdamW]():
			v = reflect.ValueOf(kernels.AdamW{LR: 1e-3, Beta1: 0.9, Beta2: 0.95, Eps: 1e-8, Step: dims[0]})
		case p.Kind() == reflect.Float64:
			v = reflect.ValueOf(1.0)
		case p.Kind() == reflect.Bool:
		case p.Kind() == reflect.Slice:
			v = reflect.MakeSlice(p, dims[0], dims[0])
		default:
			return fmt.Errorf("%s: the Contract subtest cannot make parameter %d, a %v", op.Method, j, p)
		}
		in = append(in, v)
	}
	if nb != len(lens) {
		return fmt.Errorf("%s: the method takes %d buffers, the contract lists %d", op.Method, nb, len(lens))
	}
	m.Call(in)
	return nil
}
