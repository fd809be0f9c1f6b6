package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func sampleTensors() []Tensor {
	return []Tensor{
		{Name: "layers.0.ssm.A_log", Shape: []int{2, 3}, Data: []float32{1, -2, 3.5, float32(math.Inf(1)), 0, -0.25}},
		{Name: "embed.weight", Shape: []int{3, 2}, Data: []float32{0.1, 0.2, 0.3, 0.4, 0.5, 0.6}},
		{Name: "norm_f.weight", Shape: []int{4}, Data: []float32{1, 1, 1, 1}},
		{Name: "scalar", Shape: []int{}, Data: []float32{42}},
		{Name: "empty", Shape: []int{0, 5}, Data: []float32{}},
	}
}

func TestRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "model.safetensors")
	meta := map[string]string{"config": `{"d":64}`, "step": "100"}
	in := sampleTensors()
	if err := Write(path, in, meta); err != nil {
		t.Fatalf("Write: %v", err)
	}
	f, err := Read(path)
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	if !reflect.DeepEqual(f.Metadata, meta) {
		t.Errorf("metadata = %v, want %v", f.Metadata, meta)
	}
	wantNames := []string{"embed.weight", "empty", "layers.0.ssm.A_log", "norm_f.weight", "scalar"}
	if !reflect.DeepEqual(f.Names, wantNames) {
		t.Errorf("names = %v, want %v", f.Names, wantNames)
	}
	for _, want := range in {
		got, err := f.Tensor(want.Name)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got.Shape, want.Shape) || !reflect.DeepEqual(got.Data, want.Data) {
			t.Errorf("tensor %s = %v %v, want %v %v", want.Name, got.Shape, got.Data, want.Shape, want.Data)
		}
		if f.DTypes[want.Name] != "F32" {
			t.Errorf("dtype %s = %s", want.Name, f.DTypes[want.Name])
		}
	}
	if _, err := f.Tensor("missing"); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("missing tensor error %v should name the file", err)
	}

	// Layout promises: 8-byte aligned data, offsets increasing in name order.
	b, _ := os.ReadFile(path)
	n := binary.LittleEndian.Uint64(b)
	if n%8 != 0 {
		t.Errorf("header length %d not 8-byte aligned", n)
	}
	var hdr map[string]json.RawMessage
	if err := json.Unmarshal(b[8:8+n], &hdr); err != nil {
		t.Fatal(err)
	}
	var prevEnd int64
	for _, name := range wantNames {
		var e headerEntry
		json.Unmarshal(hdr[name], &e)
		if e.DataOffsets[0] != prevEnd {
			t.Errorf("tensor %s starts at %d, want %d (sorted, packed)", name, e.DataOffsets[0], prevEnd)
		}
		prevEnd = e.DataOffsets[1]
	}
}

func TestWriteIsDeterministic(t *testing.T) {
	var a, b bytes.Buffer
	meta := map[string]string{"x": "1", "a": "2"}
	if err := Encode(&a, sampleTensors(), meta); err != nil {
		t.Fatal(err)
	}
	rev := sampleTensors()
	for i, j := 0, len(rev)-1; i < j; i, j = i+1, j-1 {
		rev[i], rev[j] = rev[j], rev[i]
	}
	if err := Encode(&b, rev, meta); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Error("input order changed the encoded bytes")
	}
}

func TestWriteInvalidKeepsOldFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ckpt.safetensors")
	if err := Write(path, sampleTensors(), nil); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(path)

	cases := []struct {
		name    string
		tensors []Tensor
	}{
		{"shape mismatch", []Tensor{{Name: "a", Shape: []int{2, 2}, Data: []float32{1, 2, 3}}}},
		{"duplicate", []Tensor{{Name: "a", Shape: []int{1}, Data: []float32{1}}, {Name: "a", Shape: []int{1}, Data: []float32{2}}}},
		{"empty name", []Tensor{{Name: "", Shape: []int{1}, Data: []float32{1}}}},
		{"reserved name", []Tensor{{Name: "__metadata__", Shape: []int{1}, Data: []float32{1}}}},
		{"negative dim", []Tensor{{Name: "a", Shape: []int{-1}, Data: nil}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := Write(path, tc.tensors, nil)
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("Write error = %v, want ErrInvalid", err)
			}
			after, _ := os.ReadFile(path)
			if !bytes.Equal(before, after) {
				t.Error("failed Write changed the existing checkpoint")
			}
		})
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("directory has %d entries, want only the checkpoint (temp files leaked)", len(entries))
	}
}

// build assembles a file from a raw header string and data bytes, so the
// corruption cases below can say exactly what they break.
func build(header string, data []byte) []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, uint64(len(header)))
	b.WriteString(header)
	b.Write(data)
	return b.Bytes()
}

func f32bytes(vs ...float32) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint32(b, math.Float32bits(v))
	}
	return b
}

func TestCorruption(t *testing.T) {
	good := build(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}`, f32bytes(1, 2))
	if _, err := Parse("good", good); err != nil {
		t.Fatalf("baseline file rejected: %v", err)
	}
	hugeLen := make([]byte, 16)
	binary.LittleEndian.PutUint64(hugeLen, 1<<40)

	cases := []struct {
		name     string
		file     []byte
		want     error
		contains string
	}{
		{"empty file", nil, ErrTruncated, "shorter than"},
		{"short prefix", []byte{1, 2, 3}, ErrTruncated, "shorter than"},
		{"absurd header length", hugeLen, ErrHeader, "exceeds"},
		{"header beyond file", good[:20], ErrTruncated, "only"},
		{"zero header length", build("", nil), ErrHeader, "does not start"},
		{"bad json", build(`{"a":`, nil), ErrHeader, "header JSON"},
		{"not an object", build(`[1,2]`, nil), ErrHeader, "does not start"},
		{"bad metadata", build(`{"__metadata__":{"k":1}}`, nil), ErrHeader, "__metadata__"},
		{"bad entry", build(`{"a":{"dtype":5}}`, nil), ErrHeader, `tensor "a"`},
		{"unknown dtype", build(`{"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}}`, []byte{0}), ErrDType, `tensor "a"`},
		{"unsupported dtype", build(`{"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}`, make([]byte, 8)), ErrDType, "I64"},
		{"one offset", build(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}`, make([]byte, 4)), ErrHeader, "data_offsets"},
		{"reversed offsets", build(`{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}`, make([]byte, 4)), ErrLayout, "increasing"},
		{"negative offset", build(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}`, make([]byte, 4)), ErrLayout, "increasing"},
		{"offset past end", build(`{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}`, f32bytes(1, 2)), ErrTruncated, "data section has 8"},
		{"truncated data", good[:len(good)-1], ErrTruncated, `tensor "a"`},
		{"shape size mismatch", build(`{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}`, f32bytes(1, 2)), ErrLayout, "needs 3×4"},
		{"negative dim", build(`{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}`, f32bytes(1, 2)), ErrLayout, "negative"},
		{"overflowing shape", build(`{"a":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,8]}}`, f32bytes(1, 2)), ErrLayout, "overflows"},
		{"overlap", build(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, f32bytes(1, 2)), ErrLayout, "overlap"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "bad.safetensors")
			if err := os.WriteFile(path, tc.file, 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := Read(path)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Read error = %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tc.contains) {
				t.Errorf("error %q should name the file and contain %q", err, tc.contains)
			}
		})
	}
}

func TestReadHalfPrecision(t *testing.T) {
	// BF16 1.5 = 0x3FC0; F16 1.5 = 0x3E00, F16 smallest subnormal = 0x0001,
	// F16 -inf = 0xFC00; F64 -2.25.
	var data []byte
	data = binary.LittleEndian.AppendUint16(data, 0x3FC0)
	data = binary.LittleEndian.AppendUint16(data, 0xBFC0)
	data = binary.LittleEndian.AppendUint16(data, 0x3E00)
	data = binary.LittleEndian.AppendUint16(data, 0x0001)
	data = binary.LittleEndian.AppendUint16(data, 0xFC00)
	data = binary.LittleEndian.AppendUint16(data, 0x8000)
	data = binary.LittleEndian.AppendUint64(data, math.Float64bits(-2.25))
	hdr := `{"b":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},` +
		`"h":{"dtype":"F16","shape":[4],"data_offsets":[4,12]},` +
		`"d":{"dtype":"F64","shape":[1,1],"data_offsets":[12,20]}}  `
	f, err := Parse("half", build(hdr, data))
	if err != nil {
		t.Fatal(err)
	}
	checks := map[string][]float32{
		"b": {1.5, -1.5},
		"h": {1.5, 1.0 / (1 << 24), float32(math.Inf(-1)), float32(math.Copysign(0, -1))},
		"d": {-2.25},
	}
	for name, want := range checks {
		got := f.Tensors[name].Data
		for i := range want {
			if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
				t.Errorf("%s[%d] = %v, want %v", name, i, got[i], want[i])
			}
		}
	}
	if f.DTypes["b"] != "BF16" || f.DTypes["h"] != "F16" {
		t.Errorf("dtypes = %v", f.DTypes)
	}
}

func TestHalfToFloat32Exhaustive(t *testing.T) {
	// Every finite half is exactly representable in float32, so converting
	// back with the standard rounding must reproduce the bits.
	for h := 0; h < 1<<16; h++ {
		f := halfToFloat32(uint16(h))
		exp := (h >> 10) & 0x1f
		if exp == 0x1f {
			if (h&0x3ff == 0) != math.IsInf(float64(f), 0) {
				t.Fatalf("half %#04x -> %v: inf/NaN mismatch", h, f)
			}
			continue
		}
		mant := float64(h & 0x3ff)
		var want float64
		if exp == 0 {
			want = mant * math.Pow(2, -24)
		} else {
			want = (1 + mant/1024) * math.Pow(2, float64(exp-15))
		}
		if h&0x8000 != 0 {
			want = -want
		}
		if float64(f) != want {
			t.Fatalf("half %#04x -> %v, want %v", h, f, want)
		}
	}
}

func FuzzParse(f *testing.F) {
	var good bytes.Buffer
	Encode(&good, sampleTensors(), map[string]string{"config": "{}"})
	f.Add(good.Bytes())
	f.Add(build(`{"a":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}}`, []byte{0, 0}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		file, err := Parse("fuzz", b)
		if err != nil {
			return
		}
		// Anything accepted must re-encode and parse to the same tensors.
		var out bytes.Buffer
		var ts []Tensor
		for _, n := range file.Names {
			ts = append(ts, file.Tensors[n])
		}
		if err := Encode(&out, ts, file.Metadata); err != nil {
			t.Fatalf("accepted file does not re-encode: %v", err)
		}
		again, err := Parse("again", out.Bytes())
		if err != nil {
			t.Fatalf("re-encoded file rejected: %v", err)
		}
		if len(again.Names) != len(file.Names) {
			t.Fatalf("tensor count changed %d -> %d", len(file.Names), len(again.Names))
		}
	})
}
