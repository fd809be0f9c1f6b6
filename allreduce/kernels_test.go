package allreduce

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// kernelInputs: seeded values with the cases rounding cares about (ties,
// NaN, ±Inf, ±0, denormals, values that round up into the exponent).
func kernelInputs(n int, seed uint64) []float32 {
	rng := rand.New(rand.NewPCG(seed, 77))
	special := []uint32{0x3f808000, 0x3f818000, 0x3f808001, 0x7f800000, 0xff800000, 0x7fc00000, 0x7f800001,
		0xffffffff, 0x00000000, 0x80000000, 0x00000001, 0x7f7fffff, 0x3fffffff, 0x807fffff}
	v := make([]float32, n)
	for i := range v {
		if rng.IntN(8) == 0 {
			v[i] = math.Float32frombits(special[rng.IntN(len(special))])
		} else {
			v[i] = math.Float32frombits(rng.Uint32())
		}
	}
	return v
}

func sameBits(t *testing.T, what string, got, want []float32) {
	t.Helper()
	for i := range want {
		g, w := got[i], want[i]
		if g != g && w != w {
			// Both NaN. Which operand's payload survives a NaN+NaN add is
			// up to the compiler's operand order, so only NaN-ness is
			// pinned. (Ranks still agree bit for bit: only the owner
			// computes a value, and all-gather copies it.)
			continue
		}
		if math.Float32bits(g) != math.Float32bits(w) {
			t.Fatalf("%s: element %d = %#x, want %#x", what, i, math.Float32bits(got[i]), math.Float32bits(want[i]))
		}
	}
}

// TestKernelsMatchReference: the assembly loops (when the CPU has AVX2)
// produce exactly the bits of the Go reference loops, for odd lengths, and
// touch nothing past the end (guard zone).
func TestKernelsMatchReference(t *testing.T) {
	if !useAVX2 {
		t.Skip("no AVX2 on this CPU: only the Go loops run")
	}
	const guard = 5
	for _, n := range []int{0, 1, 7, 8, 9, 15, 16, 17, 64, 1000, 4099} {
		a := kernelInputs(n+guard, uint64(n))
		b := kernelInputs(n+guard, uint64(n)+1000)
		wire := make([]uint16, n+guard)
		for i := range wire {
			wire[i] = bf16Bits(b[i])
		}

		want := append([]float32(nil), a...)
		addF32Go(want[:n], b[:n])
		got := append([]float32(nil), a...)
		addF32(got[:n], b[:n])
		sameBits(t, "addF32", got, want)

		wantW := append([]uint16(nil), wire...)
		want = append([]float32(nil), a...)
		addBF16EmitGo(want[:n], wantW[:n])
		gotW := append([]uint16(nil), wire...)
		got = append([]float32(nil), a...)
		addBF16Emit(got[:n], gotW[:n])
		sameBits(t, "addBF16Emit dst", got, want)
		for i := range wantW {
			if gotW[i] != wantW[i] && !(isNaN16(gotW[i]) && isNaN16(wantW[i])) {
				t.Fatalf("addBF16Emit wire n=%d: element %d = %#x, want %#x (sum %#x)", n, i, gotW[i], wantW[i], math.Float32bits(want[i]))
			}
		}

		want = append([]float32(nil), a...)
		copyBF16Go(want[:n], wire[:n])
		got = append([]float32(nil), a...)
		copyBF16(got[:n], wire[:n])
		sameBits(t, "copyBF16", got, want)

		for _, kind := range []Op{Sum, Avg} {
			wantW := append([]uint16(nil), wire...)
			want := append([]float32(nil), a...)
			finishBF16Go(want[:n], wantW[:n], kind, 3)
			gotW := append([]uint16(nil), wire...)
			got := append([]float32(nil), a...)
			finishBF16(got[:n], gotW[:n], kind, 3)
			sameBits(t, fmt.Sprintf("finishBF16 op %d", kind), got, want)
			for i := range wantW {
				if gotW[i] != wantW[i] && !(isNaN16(gotW[i]) && isNaN16(wantW[i])) {
					t.Fatalf("finishBF16 op %d wire n=%d: element %d = %#x, want %#x", kind, n, i, gotW[i], wantW[i])
				}
			}
		}

		wb := make([]byte, 2*(n+guard))
		toBF16(wb[:2*n], a[:n])
		for i := 0; i < n+guard; i++ {
			g := uint16(wb[2*i]) | uint16(wb[2*i+1])<<8
			w := uint16(0)
			if i < n {
				w = bf16Bits(a[i])
			}
			if g != w {
				t.Fatalf("toBF16 n=%d: element %d of %#x = %#x, want %#x", n, i, math.Float32bits(a[i]), g, w)
			}
		}
	}
}

func isNaN16(b uint16) bool { return b&0x7f80 == 0x7f80 && b&0x7f != 0 }
