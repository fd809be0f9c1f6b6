// Package safetensors reads and writes checkpoint files in the Hugging Face
// safetensors format: an 8-byte little-endian header length, a JSON header
// mapping each tensor name to its dtype, shape and byte span (plus an optional
// "__metadata__" string map), then the raw little-endian tensor data.
//
// The package owns the byte layout and its validation only. Tensor naming and
// the model config stored under the "config" metadata key belong to the model
// package (see docs/model.md §7); nothing here interprets them.
//
// Writes are always float32 (dtype F32). Reads accept F32, F64, F16 and BF16
// and widen or narrow them to float32, so checkpoints exported from PyTorch in
// half precision load without a conversion step.
//
// We do not use github.com/nlpodyssey/safetensors: it has no tagged release,
// its writer needs every tensor wrapped in an interface type, and it neither
// writes atomically nor names the file and tensor in its errors, which is
// most of what this package is for.
package safetensors

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"os"
	"slices"
	"sort"
	"strings"

	"github.com/bmojo/bmojo/internal/fsutil"
)

// Sentinel errors. Every error returned by Read, Parse, Write and Encode that
// concerns file content wraps exactly one of these, so callers can
// errors.Is them and still show the wrapped message, which names the file and
// the tensor.
var (
	// ErrTruncated: the file ends before the header or a tensor's data does.
	ErrTruncated = errors.New("file truncated")
	// ErrHeader: the header length is absurd or the JSON header is malformed.
	ErrHeader = errors.New("invalid header")
	// ErrLayout: a tensor's byte span is out of range, overlaps another, or
	// does not match its shape and dtype.
	ErrLayout = errors.New("invalid tensor layout")
	// ErrDType: a tensor has a dtype this package cannot convert to float32.
	ErrDType = errors.New("unsupported dtype")
	// ErrInvalid: Write was given tensors that cannot be stored (empty or
	// duplicate name, shape that does not match the data length).
	ErrInvalid = errors.New("invalid tensor")
)

// MaxHeaderBytes bounds the JSON header. The reference Rust implementation
// uses the same 100 MB limit; a larger length means a corrupt or hostile
// file, and refusing it keeps Read from allocating gigabytes on garbage.
const MaxHeaderBytes = 100 << 20

// metadataKey is the reserved header key for the free-form string map.
const metadataKey = "__metadata__"

// Tensor is one named float32 tensor in row-major (C) order.
type Tensor struct {
	Name  string
	Shape []int
	Data  []float32
}

// File is a parsed safetensors file.
type File struct {
	// Path is the file the tensors came from ("" when parsed from memory
	// without a name); it is kept for error messages.
	Path string
	// Tensors maps name to tensor. Data is always float32, whatever dtype
	// the file stored.
	Tensors map[string]Tensor
	// Names lists the tensor names sorted, for deterministic iteration.
	Names []string
	// DTypes records the dtype each tensor was stored as ("F32", "BF16", ...).
	DTypes map[string]string
	// Metadata is the "__metadata__" map; empty (not nil) when absent.
	Metadata map[string]string
}

// Tensor returns the named tensor, with an error naming the file and tensor
// when it is missing; that is the error a checkpoint loader wants to show.
func (f *File) Tensor(name string) (Tensor, error) {
	t, ok := f.Tensors[name]
	if !ok {
		return Tensor{}, fmt.Errorf("safetensors: %s: no tensor %q (file has %d tensors)", f.displayPath(), name, len(f.Tensors))
	}
	return t, nil
}

func (f *File) displayPath() string {
	if f.Path == "" {
		return "<memory>"
	}
	return f.Path
}

// headerEntry is one tensor's entry in the JSON header.
type headerEntry struct {
	DType       string  `json:"dtype"`
	Shape       []int64 `json:"shape"`
	DataOffsets []int64 `json:"data_offsets"`
}

// dtypeSize gives the element size of every dtype the spec defines, so that
// an unsupported-but-valid dtype is reported as such rather than as garbage.
var dtypeSize = map[string]int64{
	"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
	"I16": 2, "U16": 2, "F16": 2, "BF16": 2,
	"I32": 4, "U32": 4, "F32": 4,
	"I64": 8, "U64": 8, "F64": 8,
}

// readable lists the dtypes Parse converts to float32.
var readable = map[string]bool{"F32": true, "F64": true, "F16": true, "BF16": true}

// Read loads and validates a safetensors file.
func Read(path string) (*File, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("safetensors: read checkpoint: %w", err)
	}
	return Parse(path, b)
}

// Parse validates and decodes a safetensors file held in memory. name is used
// only in error messages and File.Path. Parse never panics on malformed input.
func Parse(name string, b []byte) (*File, error) {
	f := &File{Path: name}
	where := f.displayPath()
	if len(b) < 8 {
		return nil, fail(ErrTruncated, where, "%d bytes, shorter than the 8-byte header length prefix", len(b))
	}
	n := binary.LittleEndian.Uint64(b[:8])
	if n > MaxHeaderBytes {
		return nil, fail(ErrHeader, where, "header length %d exceeds the %d-byte limit (not a safetensors file, or corrupt)", n, MaxHeaderBytes)
	}
	if n > uint64(len(b)-8) {
		return nil, fail(ErrTruncated, where, "header length %d but only %d bytes follow the prefix", n, len(b)-8)
	}
	hdr := b[8 : 8+n]
	data := b[8+n:]

	// The spec requires the header to be a JSON object; checking the first
	// byte gives a clearer message than json's for e.g. a zero-filled file.
	if len(hdr) == 0 || hdr[0] != '{' {
		return nil, fail(ErrHeader, where, "header does not start with '{' (not a safetensors file)")
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(hdr, &raw); err != nil {
		return nil, fail(ErrHeader, where, "header JSON: %v", err)
	}

	f.Metadata = map[string]string{}
	if m, ok := raw[metadataKey]; ok {
		if err := json.Unmarshal(m, &f.Metadata); err != nil {
			return nil, fail(ErrHeader, where, "%s must map strings to strings: %v", metadataKey, err)
		}
		if f.Metadata == nil { // JSON null
			f.Metadata = map[string]string{}
		}
		delete(raw, metadataKey)
	}

	type span struct {
		name       string
		begin, end int64
	}
	entries := make(map[string]headerEntry, len(raw))
	spans := make([]span, 0, len(raw))
	for name, msg := range raw {
		if name == "" {
			return nil, fail(ErrHeader, where, "tensor with an empty name")
		}
		var e headerEntry
		if err := json.Unmarshal(msg, &e); err != nil {
			return nil, fail(ErrHeader, where, "tensor %q: header entry: %v", name, err)
		}
		size, ok := dtypeSize[e.DType]
		if !ok {
			return nil, fail(ErrDType, where, "tensor %q: unknown dtype %q", name, e.DType)
		}
		if !readable[e.DType] {
			return nil, fail(ErrDType, where, "tensor %q: dtype %s (bmojo reads F32, F64, F16, BF16; convert the checkpoint to F32)", name, e.DType)
		}
		if len(e.DataOffsets) != 2 {
			return nil, fail(ErrHeader, where, "tensor %q: data_offsets has %d entries, want 2", name, len(e.DataOffsets))
		}
		begin, end := e.DataOffsets[0], e.DataOffsets[1]
		if begin < 0 || end < begin {
			return nil, fail(ErrLayout, where, "tensor %q: data_offsets [%d, %d] are not an increasing pair", name, begin, end)
		}
		if end > int64(len(data)) {
			return nil, fail(ErrTruncated, where, "tensor %q: data ends at byte %d but the data section has %d bytes", name, end, len(data))
		}
		numel, ok := numElements(e.Shape)
		if !ok {
			return nil, fail(ErrLayout, where, "tensor %q: shape %v is negative or overflows", name, e.Shape)
		}
		hi, want := bits.Mul64(uint64(numel), uint64(size))
		if hi != 0 || want != uint64(end-begin) {
			return nil, fail(ErrLayout, where, "tensor %q: shape %v of %s needs %d×%d bytes but data_offsets span %d bytes", name, e.Shape, e.DType, numel, size, end-begin)
		}
		entries[name] = e
		spans = append(spans, span{name, begin, end})
	}

	// Overlapping spans would let two tensors alias the same bytes, which a
	// well-formed writer never produces; treat it as corruption.
	sort.Slice(spans, func(i, j int) bool {
		if spans[i].begin != spans[j].begin {
			return spans[i].begin < spans[j].begin
		}
		return spans[i].name < spans[j].name
	})
	for i := 1; i < len(spans); i++ {
		p, c := spans[i-1], spans[i]
		if c.begin < p.end {
			return nil, fail(ErrLayout, where, "tensor %q bytes [%d, %d) overlap tensor %q bytes [%d, %d)", c.name, c.begin, c.end, p.name, p.begin, p.end)
		}
	}

	f.Tensors = make(map[string]Tensor, len(entries))
	f.DTypes = make(map[string]string, len(entries))
	f.Names = make([]string, 0, len(entries))
	for name, e := range entries {
		shape := make([]int, len(e.Shape))
		for i, d := range e.Shape {
			shape[i] = int(d)
		}
		f.Tensors[name] = Tensor{
			Name:  name,
			Shape: shape,
			Data:  decode(e.DType, data[e.DataOffsets[0]:e.DataOffsets[1]]),
		}
		f.DTypes[name] = e.DType
		f.Names = append(f.Names, name)
	}
	sort.Strings(f.Names)
	return f, nil
}

// numElements multiplies out a shape, rejecting negative dimensions and
// products that do not fit in an int64 (a corrupt header can hold anything).
func numElements(shape []int64) (int64, bool) {
	n := uint64(1)
	for _, d := range shape {
		if d < 0 {
			return 0, false
		}
		hi, lo := bits.Mul64(n, uint64(d))
		if hi != 0 || lo > math.MaxInt64 {
			return 0, false
		}
		n = lo
	}
	return int64(n), true
}

// decode converts little-endian element bytes of a readable dtype to float32.
// The caller has checked that len(b) is a multiple of the element size.
func decode(dtype string, b []byte) []float32 {
	switch dtype {
	case "F32":
		out := make([]float32, len(b)/4)
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
		}
		return out
	case "F64":
		out := make([]float32, len(b)/8)
		for i := range out {
			out[i] = float32(math.Float64frombits(binary.LittleEndian.Uint64(b[8*i:])))
		}
		return out
	case "BF16":
		// bfloat16 is the top half of a float32, so widening is a shift.
		out := make([]float32, len(b)/2)
		for i := range out {
			out[i] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(b[2*i:])) << 16)
		}
		return out
	case "F16":
		out := make([]float32, len(b)/2)
		for i := range out {
			out[i] = halfToFloat32(binary.LittleEndian.Uint16(b[2*i:]))
		}
		return out
	}
	return nil // unreachable: Parse rejects other dtypes first
}

// halfToFloat32 widens an IEEE 754 binary16 value exactly.
func halfToFloat32(h uint16) float32 {
	sign := uint32(h>>15) << 31
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h) & 0x3ff
	switch {
	case exp == 0x1f: // inf or NaN; keep the payload
		return math.Float32frombits(sign | 0xff<<23 | mant<<13)
	case exp != 0: // normal: rebias 15 -> 127
		return math.Float32frombits(sign | (exp+112)<<23 | mant<<13)
	case mant == 0: // signed zero
		return math.Float32frombits(sign)
	default: // subnormal half is a normal float32: mant × 2^-24
		f := float32(mant) * (1.0 / (1 << 24))
		if sign != 0 {
			f = -f
		}
		return f
	}
}

// Write stores tensors (as F32) and metadata at path atomically and durably
// (internal/fsutil.WriteFile): a reader sees either the old complete file or
// the new complete file, never a partial checkpoint.
func Write(path string, tensors []Tensor, metadata map[string]string) error {
	if _, err := fsutil.WriteFile(path, func(w io.Writer) error { return encode(w, tensors, metadata) }); err != nil {
		return fmt.Errorf("safetensors: %w", err)
	}
	return nil
}

// fail builds a content error: "safetensors: FILE: DETAIL: SENTINEL".
func fail(sentinel error, where, format string, args ...any) error {
	return fmt.Errorf("safetensors: %s: %s: %w", where, fmt.Sprintf(format, args...), sentinel)
}

// Encode writes tensors (as F32, sorted by name, packed back to back) and
// metadata in safetensors format to w. It validates everything before writing
// the first byte, so an invalid tensor never produces partial output.
func Encode(w io.Writer, tensors []Tensor, metadata map[string]string) error {
	if err := encode(w, tensors, metadata); err != nil {
		return fmt.Errorf("safetensors: encode: %w", err)
	}
	return nil
}

func encode(w io.Writer, tensors []Tensor, metadata map[string]string) error {
	sorted := slices.Clone(tensors)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })

	header := make(map[string]any, len(sorted)+1)
	if len(metadata) > 0 {
		header[metadataKey] = metadata
	}
	var offset int64
	for i, t := range sorted {
		if t.Name == "" || t.Name == metadataKey {
			return fmt.Errorf("tensor %d has reserved or empty name %q: %w", i, t.Name, ErrInvalid)
		}
		if i > 0 && sorted[i-1].Name == t.Name {
			return fmt.Errorf("duplicate tensor name %q: %w", t.Name, ErrInvalid)
		}
		shape := make([]int64, len(t.Shape))
		for k, d := range t.Shape {
			shape[k] = int64(d)
		}
		numel, ok := numElements(shape)
		if !ok || numel != int64(len(t.Data)) {
			return fmt.Errorf("tensor %q: shape %v holds %d elements but Data has %d: %w", t.Name, t.Shape, numel, len(t.Data), ErrInvalid)
		}
		end := offset + 4*numel
		header[t.Name] = headerEntry{DType: "F32", Shape: shape, DataOffsets: []int64{offset, end}}
		offset = end
	}

	js, err := json.Marshal(header) // map keys marshal sorted: deterministic bytes
	if err != nil {
		return fmt.Errorf("header: %w", err)
	}
	// Pad with spaces (valid JSON whitespace, as the spec allows) so the data
	// section starts 8-byte aligned and can be memory-mapped as float32.
	if pad := len(js) % 8; pad != 0 {
		js = append(js, strings.Repeat(" ", 8-pad)...)
	}
	var prefix [8]byte
	binary.LittleEndian.PutUint64(prefix[:], uint64(len(js)))
	if _, err := w.Write(prefix[:]); err != nil {
		return err
	}
	if _, err := w.Write(js); err != nil {
		return err
	}

	buf := make([]byte, 0, 64<<10)
	for _, t := range sorted {
		for _, v := range t.Data {
			buf = binary.LittleEndian.AppendUint32(buf, math.Float32bits(v))
			if len(buf) == cap(buf) {
				if _, err := w.Write(buf); err != nil {
					return fmt.Errorf("tensor %q: %w", t.Name, err)
				}
				buf = buf[:0]
			}
		}
	}
	if len(buf) > 0 {
		if _, err := w.Write(buf); err != nil {
			return err
		}
	}
	return nil
}
