package allreduce

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/bmojo/bmojo/internal/pki"
	pb "github.com/bmojo/bmojo/proto/allreducepb"
)

// sockBinding is the 64-byte binding a data socket presents.
func sockBinding(epoch uint64, src, world, idx, count int, nonce []byte) []byte {
	b := make([]byte, sockBindBytes)
	le := binary.LittleEndian
	le.PutUint32(b[0:], sockBindMagic)
	le.PutUint32(b[sockBindVersion:], sockVersion)
	le.PutUint64(b[sockBindEpoch:], epoch)
	le.PutUint32(b[sockBindSrc:], uint32(src))
	le.PutUint32(b[sockBindWorld:], uint32(world))
	le.PutUint32(b[sockBindIndex:], uint32(idx))
	le.PutUint32(b[sockBindCount:], uint32(count))
	copy(b[sockBindNonce:], nonce)
	return b
}

// rawSocket dials addr as a data socket would: the preamble, TLS with tc
// (none when nil), then the given binding and whatever follows. It returns
// the connection and the error of reading the acknowledgement (nil: the
// receiver bound it).
func rawSocket(t *testing.T, addr string, tc *tls.Config, binding []byte, after ...[]byte) (net.Conn, error) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(sockPreamble)); err != nil {
		return c, err
	}
	conn := c
	if tc != nil {
		tc = tc.Clone()
		tc.ServerName = "127.0.0.1"
		tl := tls.Client(c, tc)
		if err := tl.Handshake(); err != nil {
			return c, err
		}
		conn = tl
	}
	for _, b := range append([][]byte{binding}, after...) {
		if _, err := conn.Write(b); err != nil {
			return conn, err
		}
	}
	var ack [sockAckBytes]byte
	if _, err := io.ReadFull(conn, ack[:]); err != nil {
		return conn, err
	}
	if binary.LittleEndian.Uint32(ack[:]) != sockAckMagic {
		return conn, fmt.Errorf("ack %x", ack)
	}
	_ = c.SetDeadline(time.Time{})
	return conn, nil
}

// sockFakePred plays rank 0 of a 2-rank ring whose rank 1 is real, over
// data sockets: it offers them in its HELLO and binds them, so a test can
// write any bytes on rank 1's incoming data sockets.
type sockFakePred struct {
	conns  []net.Conn
	stream grpc.ClientStream
	seq    []uint64
	succ   countingDrain // rank 1's successor (over gRPC)
}

// countingDrain is a drainServer that also passes on the step of every DATA
// frame it has read, so that a test playing rank 0 can keep to the ring's
// causality:
// the predecessor only sends a segment's final value once its own copy of
// that segment has reached the next rank (the real rank sends from its
// buffer without a copy, and receives the final value into the same place).
type countingDrain struct {
	pb.UnimplementedRingServer
	steps chan uint32
}

func (d countingDrain) Push(s grpc.ClientStreamingServer[pb.Frame, pb.PushSummary]) error {
	if err := s.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	for {
		f := &inFrame{}
		if err := s.RecvMsg(f); err != nil {
			return nil
		}
		if f.hdr.GetKind() == pb.Kind_KIND_DATA {
			select {
			case d.steps <- f.hdr.GetStep():
			default:
			}
		}
		f.release()
	}
}

func newSockFakePred(t *testing.T, cfg Config) (*sockFakePred, *Ring) {
	t.Helper()
	cfg.Transport = TransportSocket
	succ := countingDrain{steps: make(chan uint32, 1<<10)}
	real, conn := fakePredSetupWith(t, cfg, succ)
	nonce, err := newSockNonce()
	if err != nil {
		t.Fatal(err)
	}
	k := cfg.Streams
	s := pushStream(t, conn)
	if err := s.SendMsg(&outFrame{hdr: &pb.FrameHeader{Kind: pb.Kind_KIND_HELLO, Epoch: 5, SrcRank: 0, WorldSize: 2,
		Stream: 0, Streams: uint32(k + 1), SockNonce: nonce, Sockets: uint32(k)}}); err != nil {
		t.Fatal(err)
	}
	md, err := s.Header()
	if err != nil || len(md.Get(sockMetaKey)) != 1 || md.Get(sockMetaKey)[0] != "ok" {
		t.Fatalf("real rank did not accept the data sockets: %v, %v", md, err)
	}
	fp := &sockFakePred{stream: s, seq: make([]uint64, k), succ: succ}
	for i := 0; i < k; i++ {
		c, err := rawSocket(t, real.Addr().String(), nil, sockBinding(5, 0, 2, i, k, nonce))
		if err != nil {
			t.Fatalf("socket %d: %v", i, err)
		}
		fp.conns = append(fp.conns, c)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := real.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	if _, in := real.Transport(); in != TransportSocket {
		t.Fatalf("real rank receives over %q", in)
	}
	return fp, real
}

// put writes one chunk (header and payload) on socket k, as a sender
// would; mod may change the header bytes.
func (fp *sockFakePred) put(t *testing.T, k int, h *pb.FrameHeader, payload int, mod func(hdr []byte)) {
	t.Helper()
	b := make([]byte, slotHdrBytes+payload)
	putSlotHeader(b, fp.seq[k], h)
	fp.seq[k]++
	if mod != nil {
		mod(b)
	}
	if _, err := fp.conns[k].Write(b); err != nil {
		t.Logf("fake send: %v", err) // the real rank may already have hung up
	}
}

// TestSockBadInput: every kind of bad bytes on a data socket makes the
// collective fail with an error naming rank 0 (the predecessor), quickly and
// without a panic; a predecessor that never writes, or sends too little,
// fails it at the hop deadline; one whose sockets break, within the grace
// an ABORT gets.
func TestSockBadInput(t *testing.T) {
	checkNoLeaks(t)
	const length = 8 // 2 ranks, 1 chunk: rank 1 first receives elements [0,4)
	data := func(mod func(h *pb.FrameHeader)) *pb.FrameHeader {
		h := &pb.FrameHeader{Kind: pb.Kind_KIND_DATA, Epoch: 5, SrcRank: 0, Op: 1,
			Step: 0, Chunk: 0, TotalElems: length, Dtype: pb.DType_DTYPE_F32, Elems: 4}
		if mod != nil {
			mod(h)
		}
		return h
	}
	type chunkIn struct {
		h       *pb.FrameHeader
		payload int
		mod     func(hdr []byte)
	}
	ok := func(mod func(h *pb.FrameHeader)) chunkIn { return chunkIn{h: data(mod), payload: 16} }
	cases := []struct {
		name      string
		chunks    []chunkIn
		frames    []any // on the gRPC control stream
		close     bool  // then close the data socket
		want      error
		step      int
		wantDelay time.Duration
	}{
		{name: "connects but never sends", want: ErrHopTimeout, step: 0, wantDelay: time.Second},
		{name: "missing chunk", chunks: []chunkIn{ok(nil)}, want: ErrHopTimeout, step: 1, wantDelay: time.Second},
		{name: "short payload", chunks: []chunkIn{{h: data(nil), payload: 8}}, want: ErrHopTimeout, step: 0, wantDelay: time.Second},
		{name: "socket closed mid-collective", chunks: []chunkIn{ok(nil)}, close: true, want: ErrPeerFailed, step: 1},
		{name: "corrupted header", chunks: []chunkIn{{h: data(nil), payload: 16, mod: func(b []byte) { b[slotMagicOff] ^= 0xff }}}, want: ErrFrame, step: 0},
		{name: "wrong sequence number", chunks: []chunkIn{{h: data(nil), payload: 16, mod: func(b []byte) { b[slotSeqOff] = 5 }}}, want: ErrFrame, step: 0},
		{name: "wrong epoch", chunks: []chunkIn{ok(func(h *pb.FrameHeader) { h.Epoch = 4 })}, want: ErrEpoch, step: -1},
		{name: "wrong source rank", chunks: []chunkIn{ok(func(h *pb.FrameHeader) { h.SrcRank = 1 })}, want: ErrProtocol, step: -1},
		{name: "wrong kind", chunks: []chunkIn{ok(func(h *pb.FrameHeader) { h.Kind = pb.Kind_KIND_ABORT })}, want: ErrFrame, step: 0},
		{name: "unknown dtype", chunks: []chunkIn{ok(func(h *pb.FrameHeader) { h.Dtype = 7 })}, want: ErrFrame, step: 0},
		{name: "wrong dtype", chunks: []chunkIn{ok(func(h *pb.FrameHeader) { h.Dtype = pb.DType_DTYPE_BF16 })}, want: ErrProtocol, step: 0},
		{name: "huge element count", chunks: []chunkIn{ok(func(h *pb.FrameHeader) { h.Elems = 1 << 30 })}, want: ErrProtocol, step: 0},
		{name: "wrong chunk length", chunks: []chunkIn{{h: data(func(h *pb.FrameHeader) { h.Elems = 3 }), payload: 12}}, want: ErrProtocol, step: 0},
		{name: "wrong total length", chunks: []chunkIn{ok(func(h *pb.FrameHeader) { h.TotalElems = 9 })}, want: ErrProtocol, step: 0},
		{name: "chunk out of range", chunks: []chunkIn{ok(func(h *pb.FrameHeader) { h.Chunk = 3 })}, want: ErrProtocol, step: 0},
		{name: "step out of range", chunks: []chunkIn{ok(func(h *pb.FrameHeader) { h.Step = 2 })}, want: ErrProtocol, step: 2},
		{name: "out of order", chunks: []chunkIn{ok(func(h *pb.FrameHeader) { h.Step = 1 })}, want: ErrProtocol, step: 1},
		{name: "duplicate chunk", chunks: []chunkIn{ok(nil), ok(nil)}, want: ErrProtocol, step: 0},
		{name: "op from the future", chunks: []chunkIn{ok(func(h *pb.FrameHeader) { h.Op = 7 })}, want: ErrProtocol, step: 0},
		{name: "data frame on the control stream", frames: []any{&outFrame{hdr: data(nil), inline: make([]byte, 16)}}, want: ErrProtocol, step: 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.HopTimeout, cfg.Streams = time.Second, 1
			fp, real := newSockFakePred(t, cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			start := time.Now()
			h := real.Start(make([]float32, length), Sum)
			for _, ch := range c.chunks {
				fp.put(t, 0, ch.h, ch.payload, ch.mod)
			}
			for _, f := range c.frames {
				if err := fp.stream.SendMsg(f); err != nil {
					t.Logf("fake send: %v", err)
				}
			}
			if c.close {
				_ = fp.conns[0].Close()
			}
			pe := checkPeerFailure(t, h.Wait(ctx), time.Since(start), c.want, c.step, c.wantDelay)
			if c.want == ErrHopTimeout && pe.Chunk != 0 {
				t.Errorf("names chunk %d, want 0: %v", pe.Chunk, pe)
			}
		})
	}
}

// TestSockRoutesChunks: with several sockets, chunk j of every step travels
// on socket j mod sockets; the receiver reads them in plan order and the
// result is the sum.
func TestSockRoutesChunks(t *testing.T) {
	checkNoLeaks(t)
	cfg := testConfig()
	cfg.Streams = 3
	fp, real := newSockFakePred(t, cfg)
	// 2 ranks, 4 KiB chunks (1024 elements): a buffer of 2 segments of
	// 5 chunks each, the last one short.
	const length = 2 * (4*1024 + 7)
	p, err := NewPlan(2, 1, length, 1024)
	if err != nil {
		t.Fatal(err)
	}
	mine := make([]float32, length)
	for i := range mine {
		mine[i] = float32(i)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h := real.Start(mine, Sum)
	// Play rank 0, whose elements are all 1: send step 0 (rank 1 reduces
	// its segment), then step 1 (rank 1 receives rank 0's finished segment,
	// which the test makes 1000 + index) once rank 1's step 0 has left.
	for s := 0; s < p.Steps(); s++ {
		for sent := 0; s == 1 && sent < p.Chunks; {
			select {
			case step := <-fp.succ.steps:
				if step == 0 {
					sent++
				}
			case <-ctx.Done():
				t.Fatal("rank 1 did not send its step 0")
			}
		}
		for j := 0; j < p.Chunks; j++ {
			lo, hi := p.Chunk(p.RecvSegment(s), j)
			payload := make([]float32, hi-lo)
			for i := range payload {
				if s == 0 {
					payload[i] = 1
				} else {
					payload[i] = float32(1000 + lo + i)
				}
			}
			k := j % cfg.Streams
			b := make([]byte, slotHdrBytes, slotHdrBytes+4*len(payload))
			putSlotHeader(b, fp.seq[k], &pb.FrameHeader{Kind: pb.Kind_KIND_DATA, Epoch: 5, SrcRank: 0, Op: 1,
				Step: uint32(s), Chunk: uint32(j), TotalElems: length, Dtype: pb.DType_DTYPE_F32, Elems: uint32(len(payload))})
			fp.seq[k]++
			b = append(b, f32Bytes(payload)...)
			if _, err := fp.conns[k].Write(b); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := h.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	lo, hi := p.Segment(p.Owned())
	for i, v := range mine {
		want := float32(1000 + i)
		if i >= lo && i < hi {
			want = float32(i) + 1
		}
		if v != want {
			t.Fatalf("element %d = %v, want %v", i, v, want)
		}
	}
}

// TestSockStrangerRefused: nobody but the predecessor can bind a data
// socket. Strangers who know the ring's public facts connect to rank 1 with
// the socket preamble and a binding for the predecessor's slot: without
// TLS, with a certificate of another CA, with a valid job certificate of
// another slot (each followed by a data chunk of 1e30s), and, on a ring
// without TLS, with a wrong nonce. Each is refused before its binding is
// acknowledged (with VerifyPeer, before a byte inside TLS is read); the
// ring then reduces exactly and nobody failed.
func TestSockStrangerRefused(t *testing.T) {
	checkNoLeaks(t)
	poison := make([]byte, slotHdrBytes+16)
	putSlotHeader(poison, 0, &pb.FrameHeader{Kind: pb.Kind_KIND_DATA, Epoch: 5, SrcRank: 0, Op: 1,
		Step: 0, Chunk: 0, TotalElems: 12, Dtype: pb.DType_DTYPE_F32, Elems: 4})
	for i := slotHdrBytes; i < len(poison); i += 4 {
		binary.LittleEndian.PutUint32(poison[i:], math.Float32bits(1e30))
	}
	guess := make([]byte, sockNonceBytes) // the nonce travelled inside TLS

	t.Run("tls", func(t *testing.T) {
		ids := []string{"worker-a", "worker-b", "worker-c"}
		ca, err := pki.NewCA("job", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		other, err := pki.NewCA("job", time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		otherCA := issue(t, other, "worker-a").Client()
		otherCA.InsecureSkipVerify, otherCA.VerifyConnection = true, nil
		wrongSlot := issue(t, ca, "worker-c").Client()
		rings := identityRings(t, ca, ids, true, TransportSocket)
		addr := rings[1].Addr().String()
		for name, tc := range map[string]*tls.Config{"no tls": nil, "another CA": otherCA, "wrong slot": wrongSlot} {
			if _, err := rawSocket(t, addr, tc, sockBinding(5, 0, 3, 0, 2, guess), poison); err == nil {
				t.Errorf("%s: data socket bound", name)
			} else {
				t.Logf("%s: refused: %v", name, err)
			}
		}
		waitRefused(t, rings[1], "wrong slot", ErrIdentity)
		if err := rings[1].Err(); err != nil {
			t.Fatalf("a stranger failed the ring: %v", err)
		}
		in := seededInputs(11, 3, 12)
		checkResults(t, in, allReduceAll(t, rings, in, Sum), Sum, false)
	})

	t.Run("plain", func(t *testing.T) {
		rings := newRings(t, 3, func(_ int, c *Config) { c.Transport = TransportSocket })
		addr := rings[1].Addr().String()
		for name, b := range map[string][]byte{
			"wrong nonce": sockBinding(5, 0, 3, 0, 2, guess),
			"wrong epoch": sockBinding(4, 0, 3, 0, 2, guess),
			"wrong rank":  sockBinding(5, 2, 3, 0, 2, guess),
			"garbage":     []byte(strings.Repeat("x", sockBindBytes)),
		} {
			if _, err := rawSocket(t, addr, nil, b, poison); err == nil {
				t.Errorf("%s: data socket bound", name)
			} else {
				t.Logf("%s: refused: %v", name, err)
			}
		}
		if err := rings[1].Err(); err != nil {
			t.Fatalf("a stranger failed the ring: %v", err)
		}
		in := seededInputs(12, 3, 50_000)
		checkResults(t, in, allReduceAll(t, rings, in, Avg), Avg, false)
	})
}

// waitRefused waits until r has recorded a refusal wrapping want.
func waitRefused(t *testing.T, r *Ring, name string, want error) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		r.mu.Lock()
		err := r.refused
		r.mu.Unlock()
		if errors.Is(err, want) {
			t.Logf("%s: %v", name, err)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: last refusal %v, want one wrapping %v", name, err, want)
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, not waiting for a guess
	}
}
