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
//	magic "BMAR" | version | pad | header length (uint16 LE) | FrameHeader | pad bytes | payload
//
// The pad bytes put the payload at an offset that is a multiple of 4 counting
// gRPC's 5-byte message prefix, so in gRPC's (aligned) receive buffers the
// float32 payload is 4-byte aligned and is reduced through a []float32 view.
//
// The payload is the raw little-endian tensor bytes: float32 frames are sent
// straight from the caller's buffer (no copy before gRPC's own framing) and
// received into the reduction loop straight from gRPC's receive buffers.
const (
	frameMagic    = "BMAR"
	frameVersion  = 1
	framePrefix   = 4 + 1 + 1 + 2
	grpcPrefix    = 5 // gRPC's compressed-flag + length in front of every message
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

// inFrame is a decoded frame whose payload still lives in gRPC's buffers,
// or in a shared-memory slot.
type inFrame struct {
	hdr     *pb.FrameHeader
	payload [][]byte
	bufs    mem.BufferSlice
	// slot is the payload when it is one contiguous shared-memory slot
	// that this rank may overwrite until it frees the slot.
	slot []byte
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
	pad := (4 - (grpcPrefix+framePrefix+len(hb))%4) % 4
	b := make([]byte, framePrefix, framePrefix+len(hb)+pad+len(inline))
	copy(b, frameMagic)
	b[4] = frameVersion
	b[5] = byte(pad)
	binary.LittleEndian.PutUint16(b[6:], uint16(len(hb)))
	b = append(b, hb...)
	b = append(b, make([]byte, pad)...)
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
	pad := int(pre[5])
	hlen := int(binary.LittleEndian.Uint16(pre[6:]))
	if pad > 3 || hlen > maxHeaderLen || framePrefix+hlen+pad > total {
		return nil, nil, fmt.Errorf("allreduce: frame header length %d, pad %d (frame %d bytes): %w", hlen, pad, total, ErrFrame)
	}
	hb := make([]byte, hlen+pad)
	rest = readInto(hb, rest)
	h := &pb.FrameHeader{}
	if err := gproto.Unmarshal(hb[:hlen], h); err != nil {
		return nil, nil, fmt.Errorf("allreduce: frame header: %w: %v", ErrFrame, err)
	}
	plen := total - framePrefix - hlen - pad
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
	if len(dst) == 0 {
		return
	}
	if d == pb.DType_DTYPE_F32 {
		b = b[:len(dst)*4]
		if !reduce {
			copy(f32Bytes(dst), b)
			return
		}
		if uintptr(unsafe.Pointer(&b[0]))%4 == 0 {
			addF32(dst, unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), len(dst)))
			return
		}
		for i := range dst {
			dst[i] += math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
		}
		return
	}
	b = b[:len(dst)*2]
	if uintptr(unsafe.Pointer(&b[0]))%2 == 0 {
		src := unsafe.Slice((*uint16)(unsafe.Pointer(&b[0])), len(dst))
		if reduce {
			addBF16(dst, src)
		} else {
			copyBF16(dst, src)
		}
		return
	}
	for i := range dst {
		v := math.Float32frombits(uint32(binary.LittleEndian.Uint16(b[2*i:])) << 16)
		if reduce {
			dst[i] += v
		} else {
			dst[i] = v
		}
	}
}

// addF32 is dst += src: AVX2 where the CPU has it, then the Go loop.
func addF32(dst, src []float32) {
	k := addF32Fast(dst, src)
	addF32Go(dst[k:], src[k:])
}

// addF32Go is the reference: dst += src, unrolled by 8 so the compiler
// drops bounds checks and keeps several adds in flight.
func addF32Go(dst, src []float32) {
	src = src[:len(dst)]
	i := 0
	for ; i+8 <= len(dst); i += 8 {
		d, s := dst[i:i+8:i+8], src[i:i+8:i+8]
		d[0] += s[0]
		d[1] += s[1]
		d[2] += s[2]
		d[3] += s[3]
		d[4] += s[4]
		d[5] += s[5]
		d[6] += s[6]
		d[7] += s[7]
	}
	for ; i < len(dst); i++ {
		dst[i] += src[i]
	}
}

func addBF16(dst []float32, src []uint16) {
	src = src[:len(dst)]
	i := 0
	for ; i+4 <= len(dst); i += 4 {
		d, s := dst[i:i+4:i+4], src[i:i+4:i+4]
		d[0] += math.Float32frombits(uint32(s[0]) << 16)
		d[1] += math.Float32frombits(uint32(s[1]) << 16)
		d[2] += math.Float32frombits(uint32(s[2]) << 16)
		d[3] += math.Float32frombits(uint32(s[3]) << 16)
	}
	for ; i < len(dst); i++ {
		dst[i] += math.Float32frombits(uint32(src[i]) << 16)
	}
}

func copyBF16(dst []float32, src []uint16) {
	k := copyBF16Fast(dst, src)
	copyBF16Go(dst[k:], src[k:])
}

// copyBF16Go is the reference: dst = widen(src).
func copyBF16Go(dst []float32, src []uint16) {
	src = src[:len(dst)]
	for i := range dst {
		dst[i] = math.Float32frombits(uint32(src[i]) << 16)
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
	if len(src) > 0 && uintptr(unsafe.Pointer(&dst[0]))%2 == 0 {
		d := unsafe.Slice((*uint16)(unsafe.Pointer(&dst[0])), len(src))
		i := toBF16Fast(d, src)
		for ; i+4 <= len(src); i += 4 {
			dd, ss := d[i:i+4:i+4], src[i:i+4:i+4]
			dd[0] = bf16Bits(ss[0])
			dd[1] = bf16Bits(ss[1])
			dd[2] = bf16Bits(ss[2])
			dd[3] = bf16Bits(ss[3])
		}
		for ; i < len(src); i++ {
			d[i] = bf16Bits(src[i])
		}
		return
	}
	for i, v := range src {
		binary.LittleEndian.PutUint16(dst[2*i:], bf16Bits(v))
	}
}

// bf16Bits rounds to nearest, ties to even; a NaN stays a (quiet) NaN.
// Written branch-free (the compiler uses a conditional move): this runs
// once per element sent.
func bf16Bits(v float32) uint16 {
	u := math.Float32bits(v)
	r := (u + 0x7fff + (u>>16)&1) >> 16
	q := u>>16 | 0x40
	if u&0x7fffffff > 0x7f800000 {
		r = q
	}
	return uint16(r)
}

// roundBF16 rounds every element to the nearest bfloat16 value, in place.
func roundBF16(v []float32) {
	for i, x := range v {
		v[i] = math.Float32frombits(uint32(bf16Bits(x)) << 16)
	}
}

// applyBF16Fused applies a bf16 payload to dst and leaves in w (2 bytes per
// element) what this rank sends next for the same chunk:
//   - reduce-scatter: dst += payload, w = bf16(dst); on the owner's last
//     reduce step dst is finished (averaged, rounded to bf16) first, so w
//     holds exactly the bits every rank will end with;
//   - all-gather: dst = payload widened, w = payload verbatim (forwarded).
//
// The payload is first gathered into w (gRPC may cut it anywhere), then one
// pass does the arithmetic in place.
func applyBF16Fused(dst []float32, pieces [][]byte, w []byte, reduce, finishing bool, kind Op, n int) {
	w = w[:2*len(dst)]
	off := 0
	for _, p := range pieces {
		off += copy(w[off:], p)
	}
	if len(dst) == 0 {
		return
	}
	ws := unsafe.Slice((*uint16)(unsafe.Pointer(&w[0])), len(dst)) // pooled buffers are aligned
	switch {
	case !reduce:
		copyBF16(dst, ws)
	case finishing:
		finishBF16(dst, ws, kind, n)
	default:
		addBF16Emit(dst, ws)
	}
}

// addBF16Emit is dst += widen(ws); ws = bf16(dst).
func addBF16Emit(dst []float32, ws []uint16) {
	k := addBF16EmitFast(dst, ws)
	addBF16EmitGo(dst[k:], ws[k:])
}

// addBF16EmitGo is the reference of addBF16Emit, unrolled by 4.
func addBF16EmitGo(dst []float32, ws []uint16) {
	ws = ws[:len(dst)]
	i := 0
	for ; i+4 <= len(dst); i += 4 {
		d, s := dst[i:i+4:i+4], ws[i:i+4:i+4]
		v0 := d[0] + math.Float32frombits(uint32(s[0])<<16)
		v1 := d[1] + math.Float32frombits(uint32(s[1])<<16)
		v2 := d[2] + math.Float32frombits(uint32(s[2])<<16)
		v3 := d[3] + math.Float32frombits(uint32(s[3])<<16)
		d[0], d[1], d[2], d[3] = v0, v1, v2, v3
		s[0], s[1], s[2], s[3] = bf16Bits(v0), bf16Bits(v1), bf16Bits(v2), bf16Bits(v3)
	}
	for ; i < len(dst); i++ {
		v := dst[i] + math.Float32frombits(uint32(ws[i])<<16)
		dst[i] = v
		ws[i] = bf16Bits(v)
	}
}

// finishBF16 is the owner's last reduce step on a bf16 payload: dst += ws,
// averaged for Avg, rounded to bf16 into ws, and dst set to exactly that.
func finishBF16(dst []float32, ws []uint16, kind Op, n int) {
	div := float32(0)
	if kind == Avg {
		div = float32(n)
	}
	k := finishBF16Fast(dst, ws, div)
	finishBF16Go(dst[k:], ws[k:], kind, n)
}

// finishBF16Go is the reference of finishBF16.
func finishBF16Go(dst []float32, ws []uint16, kind Op, n int) {
	ws = ws[:len(dst)]
	d := float32(n)
	for i := range dst {
		v := dst[i] + math.Float32frombits(uint32(ws[i])<<16)
		if kind == Avg {
			v /= d
		}
		b := bf16Bits(v)
		ws[i] = b
		dst[i] = math.Float32frombits(uint32(b) << 16)
	}
}
