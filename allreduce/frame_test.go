package allreduce

import (
	"bytes"
	"errors"
	"math"
	"testing"

	"google.golang.org/grpc/mem"

	pb "github.com/bmojo/bmojo/proto/allreducepb"
)

// split cuts b into pieces at the given offsets, the way gRPC's receive
// buffers may cut a message anywhere.
func split(b []byte, cuts ...int) mem.BufferSlice {
	var out mem.BufferSlice
	prev := 0
	for _, c := range cuts {
		if c > prev && c < len(b) {
			out = append(out, mem.SliceBuffer(b[prev:c]))
			prev = c
		}
	}
	return append(out, mem.SliceBuffer(b[prev:]))
}

func dataFrameBytes(t testing.TB, vals []float32, d pb.DType) []byte {
	t.Helper()
	var payload []byte
	if d == pb.DType_DTYPE_BF16 {
		payload = make([]byte, 2*len(vals))
		toBF16(payload, vals)
	} else {
		payload = append([]byte(nil), f32Bytes(vals)...)
	}
	b, err := encodeHeader(&pb.FrameHeader{Kind: pb.Kind_KIND_DATA, Epoch: 7, Op: 1, Dtype: d, Elems: uint32(len(vals))}, payload)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestFrameRoundTripAcrossPieces(t *testing.T) {
	vals := []float32{1, -2.5, 3.25, float32(math.Pi), 1e-30, -7}
	for _, d := range []pb.DType{pb.DType_DTYPE_F32, pb.DType_DTYPE_BF16} {
		b := dataFrameBytes(t, vals, d)
		for cut1 := 1; cut1 < len(b); cut1++ {
			for _, cut2 := range []int{cut1 + 1, cut1 + 3, len(b) - 1} {
				h, payload, err := decodeFrame(split(b, cut1, cut2))
				if err != nil {
					t.Fatalf("%v cuts %d,%d: %v", d, cut1, cut2, err)
				}
				if h.GetEpoch() != 7 || int(h.GetElems()) != len(vals) {
					t.Fatalf("header %v", h)
				}
				got := make([]float32, len(vals))
				applyPayload(got, payload, d, false)
				want := append([]float32(nil), vals...)
				if d == pb.DType_DTYPE_BF16 {
					roundBF16(want)
				}
				for i := range want {
					if got[i] != want[i] {
						t.Fatalf("%v cuts %d,%d: element %d = %v, want %v", d, cut1, cut2, i, got[i], want[i])
					}
				}
				applyPayload(got, payload, d, true) // reduce: doubles
				for i := range want {
					if got[i] != 2*want[i] {
						t.Fatalf("%v reduce element %d = %v, want %v", d, i, got[i], 2*want[i])
					}
				}
			}
		}
	}
}

func TestDecodeFrameRejects(t *testing.T) {
	good := dataFrameBytes(t, []float32{1, 2}, pb.DType_DTYPE_F32)
	mutate := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	for _, c := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"short", good[:3]},
		{"bad magic", mutate(func(b []byte) []byte { b[0] = 'X'; return b })},
		{"bad version", mutate(func(b []byte) []byte { b[4] = 9; return b })},
		{"header too long", mutate(func(b []byte) []byte { b[5], b[6] = 0xff, 0xff; return b })},
		{"truncated payload", good[:len(good)-1]},
		{"extra payload", append(append([]byte(nil), good...), 0)},
		{"garbage header", mutate(func(b []byte) []byte { b[framePrefix] = 0xff; return b })},
	} {
		t.Run(c.name, func(t *testing.T) {
			if _, _, err := decodeFrame(split(c.b)); !errors.Is(err, ErrFrame) {
				t.Fatalf("err = %v, want ErrFrame", err)
			}
		})
	}
}

func TestBF16Rounding(t *testing.T) {
	for _, c := range []struct {
		in   float32
		want uint16
	}{
		{1, 0x3f80},
		{math.Float32frombits(0x3f808000), 0x3f80}, // tie, even stays
		{math.Float32frombits(0x3f818000), 0x3f82}, // tie, odd rounds up
		{math.Float32frombits(0x3f808001), 0x3f81},
		{float32(math.Inf(1)), 0x7f80},
	} {
		if got := bf16Bits(c.in); got != c.want {
			t.Errorf("bf16(%#x) = %#x, want %#x", math.Float32bits(c.in), got, c.want)
		}
	}
	if nan := bf16Bits(float32(math.NaN())); nan&0x7f80 != 0x7f80 || nan&0x7f == 0 {
		t.Errorf("NaN became %#x", nan)
	}
}

// FuzzDecodeFrame: no input panics the decoder, wherever gRPC cuts it, and
// whatever it accepts has a payload of exactly the announced size.
func FuzzDecodeFrame(f *testing.F) {
	f.Add(dataFrameBytes(f, []float32{1, 2, 3}, pb.DType_DTYPE_F32), 3, 9)
	f.Add(dataFrameBytes(f, []float32{1, 2, 3}, pb.DType_DTYPE_BF16), 1, 20)
	hello, _ := encodeHeader(&pb.FrameHeader{Kind: pb.Kind_KIND_HELLO, Streams: 2}, nil)
	f.Add(hello, 2, 5)
	f.Add([]byte("BMAR\x01\x00\x00"), 0, 0)
	f.Fuzz(func(t *testing.T, b []byte, cut1, cut2 int) {
		h, payload, err := decodeFrame(split(b, cut1, cut2))
		if err != nil {
			if !errors.Is(err, ErrFrame) {
				t.Fatalf("error %v does not wrap ErrFrame", err)
			}
			return
		}
		n := 0
		for _, p := range payload {
			n += len(p)
		}
		if h.GetKind() == pb.Kind_KIND_DATA {
			if n != int(h.GetElems())*dtypeSize(h.GetDtype()) {
				t.Fatalf("accepted %d payload bytes for %d %v elements", n, h.GetElems(), h.GetDtype())
			}
			dst := make([]float32, h.GetElems())
			applyPayload(dst, payload, h.GetDtype(), true)
		} else if n != 0 {
			t.Fatalf("accepted %v frame with %d payload bytes", h.GetKind(), n)
		}
		// Re-encoding what was accepted decodes to the same header.
		var flat []byte
		for _, p := range payload {
			flat = append(flat, p...)
		}
		b2, err := encodeHeader(h, flat)
		if err != nil {
			t.Fatal(err)
		}
		h2, p2, err := decodeFrame(split(b2))
		if err != nil || h2.GetElems() != h.GetElems() || h2.GetKind() != h.GetKind() {
			t.Fatalf("re-decode: %v %v", h2, err)
		}
		var flat2 []byte
		for _, p := range p2 {
			flat2 = append(flat2, p...)
		}
		if !bytes.Equal(flat, flat2) {
			t.Fatal("payload changed on re-encode")
		}
	})
}
