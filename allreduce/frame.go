package allreduce

import (
	"encoding/binary"
	"fmt"
	"math"
	"unsafe"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	gproto "google.golang.org/protobuf/proto"

	pb "github.com/bmojo/bmojo/proto/allreducepb"
)

// Wire layout of one frame on the data path (see proto/allreduce.proto):
//
//	magic "BMAR" | version | header length (uint16 LE) | FrameHeader | payload
//
// The payload is the raw little-endian tensor bytes: float32 frames are sent
// straight from the caller's buffer (no copy before gRPC's own framing) and
// received into the reduction loop straight from gRPC's receive buffers.
const (
	frameMagic    = "BMAR"
	frameVersion  = 1
	framePrefix   = 4 + 1 + 2
	maxHeaderLen  = 1024
	maxFrameElems = 1 << 28 // 1 GiB of float32 in one frame is far past any sane chunk
)

// codecName is the gRPC content-subtype of the pass-through codec.
const codecName = "bmojo-frame"

// frameCodec is a gRPC CodecV2 that writes frames as header + raw payload
// and hands received payloads over without copying. Messages that are not
// frames (PushSummary) go through the standard protobuf codec.
type frameCodec struct{}

var protoCodec = encoding.GetCodecV2(proto.Name)

func (frameCodec) Name() string { return codecName }

func (frameCodec) Marshal(v any) (mem.BufferSlice, error) {
	switch m := v.(type) {
	case *outFrame:
		hdr, err := encodeHeader(m.hdr, m.inline)
		if err != nil {
			return nil, err
		}
		if m.payload == nil {
			return mem.BufferSlice{mem.SliceBuffer(hdr)}, nil
		}
		p := m.payload
		m.payload = nil // gRPC owns (and frees) it from here on
		return mem.BufferSlice{mem.SliceBuffer(hdr), p}, nil
	case rawFrame:
		return mem.BufferSlice{mem.SliceBuffer(m)}, nil
	case *pb.Frame:
		b, err := encodeHeader(m.GetHeader(), m.GetPayload())
		if err != nil {
			return nil, err
		}
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	default:
		return protoCodec.Marshal(v)
	}
}

func (frameCodec) Unmarshal(data mem.BufferSlice, v any) error {
	switch m := v.(type) {
	case *inFrame:
		hdr, payload, err := decodeFrame(data)
		if err != nil {
			return err
		}
		data.Ref() // keep gRPC's buffers until the payload is applied
		m.hdr, m.payload, m.bufs = hdr, payload, data
		return nil
	case *pb.Frame:
		hdr, payload, err := decodeFrame(data)
		if err != nil {
			return err
		}
		m.Header = hdr
		m.Payload = m.Payload[:0]
		for _, p := range payload {
			m.Payload = append(m.Payload, p...)
		}
		return nil
	default:
		return protoCodec.Unmarshal(data, v)
	}
}

// outFrame is a frame on its way out. payload, when set, is handed to gRPC
// and freed by it once its bytes are copied into the connection's framer;
// inline payload bytes (small frames) are copied next to the header.
type outFrame struct {
	hdr     *pb.FrameHeader
	inline  []byte
	payload mem.Buffer
}

// rawFrame puts arbitrary bytes on the wire; tests use it to send garbage.
type rawFrame []byte

// inFrame is a decoded frame whose payload still lives in gRPC's buffers.
type inFrame struct {
	hdr     *pb.FrameHeader
	payload [][]byte
	bufs    mem.BufferSlice
}

// release returns the frame's buffers to gRPC's pool.
func (f *inFrame) release() {
	if f.bufs != nil {
		f.bufs.Free()
		f.bufs = nil
	}
	f.payload = nil
}

func encodeHeader(h *pb.FrameHeader, inline []byte) ([]byte, error) {
	hb, err := gproto.MarshalOptions{Deterministic: true}.Marshal(h)
	if err != nil {
		return nil, fmt.Errorf("allreduce: encode frame header: %w: %v", ErrFrame, err)
	}
	if len(hb) > maxHeaderLen {
		return nil, fmt.Errorf("allreduce: encode frame header of %d bytes: %w", len(hb), ErrFrame)
	}
	b := make([]byte, framePrefix, framePrefix+len(hb)+len(inline))
	copy(b, frameMagic)
	b[4] = frameVersion
	binary.LittleEndian.PutUint16(b[5:], uint16(len(hb)))
	b = append(b, hb...)
	return append(b, inline...), nil
}

// decodeFrame parses a frame from gRPC's buffers without copying its payload.
// It checks everything that can be checked without knowing the collective in
// progress: magic, version, header, kind, dtype and that the payload length
// matches the element count.
func decodeFrame(data mem.BufferSlice) (*pb.FrameHeader, [][]byte, error) {
	total := data.Len()
	if total < framePrefix {
		return nil, nil, fmt.Errorf("allreduce: frame of %d bytes is shorter than its prefix: %w", total, ErrFrame)
	}
	var pre [framePrefix]byte
	pieces := pieceList(data)
	rest := readInto(pre[:], pieces)
	if string(pre[:4]) != frameMagic {
		return nil, nil, fmt.Errorf("allreduce: frame magic %q, want %q: %w", pre[:4], frameMagic, ErrFrame)
	}
	if pre[4] != frameVersion {
		return nil, nil, fmt.Errorf("allreduce: frame version %d, this build speaks %d (run the same bmojo version on every rank): %w", pre[4], frameVersion, ErrFrame)
	}
	hlen := int(binary.LittleEndian.Uint16(pre[5:]))
	if hlen > maxHeaderLen || framePrefix+hlen > total {
		return nil, nil, fmt.Errorf("allreduce: frame header length %d (frame %d bytes): %w", hlen, total, ErrFrame)
	}
	hb := make([]byte, hlen)
	rest = readInto(hb, rest)
	h := &pb.FrameHeader{}
	if err := gproto.Unmarshal(hb, h); err != nil {
		return nil, nil, fmt.Errorf("allreduce: frame header: %w: %v", ErrFrame, err)
	}
	plen := total - framePrefix - hlen
	switch h.GetKind() {
	case pb.Kind_KIND_HELLO, pb.Kind_KIND_ABORT:
		if plen != 0 {
			return nil, nil, fmt.Errorf("allreduce: %v frame with %d payload bytes: %w", h.GetKind(), plen, ErrFrame)
		}
	case pb.Kind_KIND_DATA:
		size := dtypeSize(h.GetDtype())
		if size == 0 {
			return nil, nil, fmt.Errorf("allreduce: frame dtype %v: %w", h.GetDtype(), ErrFrame)
		}
		if h.GetElems() > maxFrameElems || plen != int(h.GetElems())*size {
			return nil, nil, fmt.Errorf("allreduce: frame of %d %v elements carries %d bytes: %w", h.GetElems(), h.GetDtype(), plen, ErrFrame)
		}
	default:
		return nil, nil, fmt.Errorf("allreduce: frame kind %v: %w", h.GetKind(), ErrFrame)
	}
	return h, rest, nil
}

func pieceList(data mem.BufferSlice) [][]byte {
	ps := make([][]byte, 0, len(data))
	for _, b := range data {
		if d := b.ReadOnlyData(); len(d) > 0 {
			ps = append(ps, d)
		}
	}
	return ps
}

// readInto fills dst from the front of pieces and returns what is left.
// The caller has checked there are enough bytes.
func readInto(dst []byte, pieces [][]byte) [][]byte {
	for len(dst) > 0 {
		n := copy(dst, pieces[0])
		dst = dst[n:]
		if n == len(pieces[0]) {
			pieces = pieces[1:]
		} else {
			pieces[0] = pieces[0][n:]
		}
	}
	return pieces
}

func dtypeSize(d pb.DType) int {
	switch d {
	case pb.DType_DTYPE_F32:
		return 4
	case pb.DType_DTYPE_BF16:
		return 2
	}
	return 0
}

// applyPayload adds (reduce) or copies the payload elements into dst. The
// payload may be split across gRPC buffers at any byte, so an element that
// straddles two pieces is reassembled.
func applyPayload(dst []float32, pieces [][]byte, d pb.DType, reduce bool) {
	size := dtypeSize(d)
	var carry [4]byte
	nc := 0
	i := 0
	for _, p := range pieces {
		if nc > 0 {
			k := copy(carry[nc:size], p)
			nc += k
			p = p[k:]
			if nc < size {
				continue
			}
			applyRun(dst[i:i+1], carry[:size], d, reduce)
			i++
			nc = 0
		}
		n := len(p) / size
		applyRun(dst[i:i+n], p[:n*size], d, reduce)
		i += n
		nc = copy(carry[:], p[n*size:])
	}
}

func applyRun(dst []float32, b []byte, d pb.DType, reduce bool) {
	switch {
	case d == pb.DType_DTYPE_F32 && reduce:
		b = b[:len(dst)*4]
		for i := range dst {
			dst[i] += math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
		}
	case d == pb.DType_DTYPE_F32:
		copy(f32Bytes(dst), b)
	case reduce:
		b = b[:len(dst)*2]
		for i := range dst {
			dst[i] += math.Float32frombits(uint32(binary.LittleEndian.Uint16(b[2*i:])) << 16)
		}
	default:
		b = b[:len(dst)*2]
		for i := range dst {
			dst[i] = math.Float32frombits(uint32(binary.LittleEndian.Uint16(b[2*i:])) << 16)
		}
	}
}

// f32Bytes views a float32 slice as its bytes. The wire is little-endian,
// as is every platform bmojo runs on (amd64, arm64).
func f32Bytes(f []float32) []byte {
	if len(f) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&f[0])), len(f)*4)
}

// toBF16 rounds src to bfloat16 (round to nearest, ties to even; NaN stays
// NaN) and writes the little-endian halves to dst.
func toBF16(dst []byte, src []float32) {
	dst = dst[:len(src)*2]
	for i, v := range src {
		binary.LittleEndian.PutUint16(dst[2*i:], bf16Bits(v))
	}
}

func bf16Bits(v float32) uint16 {
	u := math.Float32bits(v)
	if u&0x7fffffff > 0x7f800000 { // NaN: keep it a (quiet) NaN
		return uint16(u>>16) | 0x40
	}
	u += 0x7fff + (u>>16)&1
	return uint16(u >> 16)
}

// roundBF16 rounds every element to the nearest bfloat16 value, in place.
func roundBF16(v []float32) {
	for i, x := range v {
		v[i] = math.Float32frombits(uint32(bf16Bits(x)) << 16)
	}
}
