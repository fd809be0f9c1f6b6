package allreduce

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"

	pb "github.com/bmojo/bmojo/proto/allreducepb"
)

// shmFakePred plays rank 0 of a 2-rank ring whose rank 1 is real, over the
// same-host path: it offers its own shared-memory file, so a test can put
// any slot into rank 1's queues.
type shmFakePred struct {
	reg    *shmRegion
	stream grpc.ClientStream
}

func newShmFakePred(t *testing.T, cfg Config) (*shmFakePred, *Ring) {
	t.Helper()
	real, conn := fakePredSetup(t, cfg)
	reg, err := createShmRegion(newShmGeometry(cfg), 5, 0, 2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(reg.unmap)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := pushStream(t, conn)
	if err := s.SendMsg(&outFrame{hdr: &pb.FrameHeader{Kind: pb.Kind_KIND_HELLO, Epoch: 5, SrcRank: 0, WorldSize: 2,
		Stream: 0, Streams: uint32(cfg.Streams + 1), Host: real.host, ShmPath: reg.path, ShmNonce: reg.nonce}}); err != nil {
		t.Fatal(err)
	}
	md, err := s.Header()
	if err != nil || len(md.Get(shmMetaKey)) != 1 || md.Get(shmMetaKey)[0] != "ok" {
		t.Fatalf("real rank did not accept the shared memory: %v, %v", md, err)
	}
	if err := real.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	if _, in := real.Transport(); in != TransportShm {
		t.Fatalf("real rank receives over %q", in)
	}
	if _, err := os.Stat(reg.path); !os.IsNotExist(err) {
		t.Errorf("shared-memory file still has a name after the handshake: %v", err)
	}
	return &shmFakePred{reg: reg, stream: s}, real
}

// put writes one slot into queue q, as a sender would, and publishes it.
func (fp *shmFakePred) put(q int, h *pb.FrameHeader, mod func(slot []byte)) {
	qu := &fp.reg.queues[q]
	seq := qu.head.Load()
	slot := qu.slot(seq)
	putSlotHeader(slot, seq, h)
	if mod != nil {
		mod(slot)
	}
	qu.head.Store(seq + 1)
}

// TestShmBadInput: every kind of bad slot from a same-host predecessor makes
// the collective fail with an error naming rank 0, quickly, without a
// panic; a predecessor that never writes fails it at the hop deadline.
func TestShmBadInput(t *testing.T) {
	requireShm(t)
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
	type slotIn struct {
		q   int
		h   *pb.FrameHeader
		mod func(slot []byte)
	}
	cases := []struct {
		name      string
		slots     []slotIn
		frames    []any // on the gRPC control stream
		head      uint64
		want      error
		step      int
		wantDelay time.Duration
	}{
		{name: "stalled producer", want: ErrHopTimeout, step: 0, wantDelay: time.Second},
		{name: "missing chunk", slots: []slotIn{{h: data(nil)}}, want: ErrHopTimeout, step: 1, wantDelay: time.Second},
		{name: "corrupted slot header", slots: []slotIn{{h: data(nil), mod: func(s []byte) { s[slotMagicOff] ^= 0xff }}}, want: ErrFrame, step: -1},
		{name: "wrong sequence number", slots: []slotIn{{h: data(nil), mod: func(s []byte) { s[slotSeqOff] = 5 }}}, want: ErrFrame, step: -1},
		{name: "wrong epoch", slots: []slotIn{{h: data(func(h *pb.FrameHeader) { h.Epoch = 4 })}}, want: ErrEpoch, step: -1},
		{name: "wrong source rank", slots: []slotIn{{h: data(func(h *pb.FrameHeader) { h.SrcRank = 1 })}}, want: ErrProtocol, step: -1},
		{name: "wrong kind", slots: []slotIn{{h: data(func(h *pb.FrameHeader) { h.Kind = pb.Kind_KIND_HELLO })}}, want: ErrFrame, step: -1},
		{name: "unknown dtype", slots: []slotIn{{h: data(func(h *pb.FrameHeader) { h.Dtype = 7 })}}, want: ErrFrame, step: -1},
		{name: "wrong dtype", slots: []slotIn{{h: data(func(h *pb.FrameHeader) { h.Dtype = pb.DType_DTYPE_BF16 })}}, want: ErrProtocol, step: 0},
		{name: "payload larger than a slot", slots: []slotIn{{h: data(func(h *pb.FrameHeader) { h.Elems = 1 << 30 })}}, want: ErrFrame, step: -1},
		{name: "wrong chunk length", slots: []slotIn{{h: data(func(h *pb.FrameHeader) { h.Elems = 3 })}}, want: ErrProtocol, step: 0},
		{name: "wrong total length", slots: []slotIn{{h: data(func(h *pb.FrameHeader) { h.TotalElems = 9 })}}, want: ErrProtocol, step: 0},
		{name: "chunk out of range", slots: []slotIn{{h: data(func(h *pb.FrameHeader) { h.Chunk = 3 })}}, want: ErrProtocol, step: 0},
		{name: "step out of range", slots: []slotIn{{h: data(func(h *pb.FrameHeader) { h.Step = 2 })}}, want: ErrProtocol, step: 2},
		{name: "duplicate chunk", slots: []slotIn{{h: data(nil)}, {h: data(nil)}}, want: ErrProtocol, step: 0},
		{name: "op from the future", slots: []slotIn{{h: data(func(h *pb.FrameHeader) { h.Op = 7 })}}, want: ErrProtocol, step: 0},
		{name: "head past the ring", head: 100, want: ErrFrame, step: -1},
		{name: "data frame on the control stream", frames: []any{&outFrame{hdr: data(nil), inline: make([]byte, 16)}}, want: ErrProtocol, step: 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.HopTimeout = time.Second
			fp, real := newShmFakePred(t, cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			start := time.Now()
			h := real.Start(make([]float32, length), Sum)
			for _, s := range c.slots {
				fp.put(s.q, s.h, s.mod)
			}
			if c.head > 0 {
				fp.reg.queues[0].head.Store(c.head)
			}
			for _, f := range c.frames {
				if err := fp.stream.SendMsg(f); err != nil {
					t.Logf("fake send: %v", err)
				}
			}
			pe := checkPeerFailure(t, h.Wait(ctx), time.Since(start), c.want, c.step, c.wantDelay)
			if c.want == ErrHopTimeout && pe.Chunk != 0 {
				t.Errorf("names chunk %d, want 0: %v", pe.Chunk, pe)
			}
		})
	}
}

// TestShmOfferChecks: the receiver maps only a bmojo file made for this hop,
// and unlinks what it maps.
func TestShmOfferChecks(t *testing.T) {
	requireShm(t)
	g := shmGeometry{queues: 2, slots: 4, slotBytes: slotHdrBytes + 1024}
	reg, err := createShmRegion(g, 5, 0, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer reg.unmap()
	for _, c := range []struct {
		name         string
		path         string
		nonce, epoch uint64
		src          int
		want         string
	}{
		{"wrong nonce", reg.path, reg.nonce + 1, 5, 0, "nonce"},
		{"wrong epoch", reg.path, reg.nonce, 6, 0, "epoch"},
		{"wrong rank", reg.path, reg.nonce, 5, 1, "rank"},
		{"foreign file", "/etc/passwd", reg.nonce, 5, 0, "not a bmojo"},
		{"outside the shm directory", "/home/" + shmNamePrefix + "x", reg.nonce, 5, 0, "not a bmojo"},
		{"missing file", reg.path + "-gone", reg.nonce, 5, 0, "no such file"},
	} {
		if _, err := openShmRegion(c.path, c.nonce, c.epoch, c.src, 2); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err = %v, want one saying %q", c.name, err, c.want)
		}
	}
	if _, err := os.Stat(reg.path); err != nil {
		t.Fatalf("a refused open removed the file: %v", err)
	}
	in, err := openShmRegion(reg.path, reg.nonce, 5, 0, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer in.unmap()
	if in.geo != g {
		t.Errorf("geometry %+v, want %+v", in.geo, g)
	}
	if _, err := os.Stat(reg.path); !os.IsNotExist(err) {
		t.Errorf("file still has a name once both ends mapped it: %v", err)
	}
	// Both mappings are the same memory.
	reg.queues[1].head.Store(3)
	if got := in.queues[1].head.Load(); got != 3 {
		t.Errorf("receiver sees head %d, want 3", got)
	}
}
