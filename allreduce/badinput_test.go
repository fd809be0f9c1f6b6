package allreduce

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	pb "github.com/bmojo/bmojo/proto/allreducepb"
)

// drainServer stands in for a successor: accepts any stream and discards it.
type drainServer struct{ pb.UnimplementedRingServer }

func (drainServer) Push(s grpc.ClientStreamingServer[pb.Frame, pb.PushSummary]) error {
	if err := s.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	for {
		f := &inFrame{}
		if err := s.RecvMsg(f); err != nil {
			return nil
		}
		f.release()
	}
}

// fakePred plays rank 0 of a 2-rank ring whose rank 1 is real, so a test can
// put any bytes on rank 1's incoming streams.
type fakePred struct {
	streams []grpc.ClientStream
}

func newFakePred(t *testing.T, cfg Config) (*fakePred, *Ring) {
	t.Helper()
	real, conn := fakePredSetup(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	fp := &fakePred{}
	k := cfg.Streams + 1
	for i := 0; i < k; i++ {
		s := pushStream(t, conn)
		if err := s.SendMsg(&outFrame{hdr: &pb.FrameHeader{Kind: pb.Kind_KIND_HELLO, Epoch: 5, SrcRank: 0, WorldSize: 2, Stream: uint32(i), Streams: uint32(k)}}); err != nil {
			t.Fatal(err)
		}
		fp.streams = append(fp.streams, s)
	}
	if err := real.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	return fp, real
}

// fakePredSetup starts a real rank 1 of a 2-rank ring (epoch 5) whose
// successor drains everything, and a client connection to it on which the
// test plays rank 0.
func fakePredSetup(t *testing.T, cfg Config) (*Ring, *grpc.ClientConn) {
	t.Helper()
	return fakePredSetupWith(t, cfg, drainServer{})
}

// fakePredSetupWith is fakePredSetup with succ as the successor.
func fakePredSetupWith(t *testing.T, cfg Config, succ pb.RingServer) (*Ring, *grpc.ClientConn) {
	t.Helper()
	lis, addrs := listeners(t, 2)
	srv := grpc.NewServer(grpc.ForceServerCodecV2(frameCodec{}))
	pb.RegisterRingServer(srv, succ)
	go func() { _ = srv.Serve(lis[0]) }()
	t.Cleanup(srv.Stop)

	cfg.Rank, cfg.Peers, cfg.Epoch, cfg.Logger = 1, addrs, 5, testLogger(t)
	real, err := New(cfg, lis[1])
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = real.Close() })
	conn, err := grpc.NewClient(addrs[1], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return real, conn
}

// pushStream opens one Push stream on conn with the frame codec.
func pushStream(t *testing.T, conn *grpc.ClientConn) grpc.ClientStream {
	t.Helper()
	s, err := conn.NewStream(context.Background(), &pb.Ring_ServiceDesc.Streams[0], "/"+pb.Ring_ServiceDesc.ServiceName+"/Push",
		grpc.ForceCodecV2(frameCodec{}))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (fp *fakePred) send(t *testing.T, m any) {
	t.Helper()
	if err := fp.streams[0].SendMsg(m); err != nil {
		t.Logf("fake send: %v", err) // the real rank may already have hung up
	}
}

// TestBadInput: every kind of bad traffic from the predecessor makes the
// collective fail with an error naming rank 0, quickly, without a panic.
func TestBadInput(t *testing.T) {
	checkNoLeaks(t)
	const length = 8 // 2 ranks, 1 chunk: rank 1 first receives elements [0,4)
	data := func(mod func(h *pb.FrameHeader), elems int) *outFrame {
		h := &pb.FrameHeader{Kind: pb.Kind_KIND_DATA, Epoch: 5, SrcRank: 0, WorldSize: 2, Op: 1,
			Step: 0, Chunk: 0, TotalElems: length, Dtype: pb.DType_DTYPE_F32, Elems: uint32(elems)}
		if mod != nil {
			mod(h)
		}
		return &outFrame{hdr: h, inline: make([]byte, elems*dtypeSize(h.Dtype))}
	}
	cases := []struct {
		name      string
		frames    []any
		want      error
		step      int
		wantDelay time.Duration // the failure must not come before this (deadline cases)
	}{
		{"connects but never sends", nil, ErrHopTimeout, 0, time.Second},
		{"missing chunk", []any{data(nil, 4)}, ErrHopTimeout, 1, time.Second},
		{"wrong epoch", []any{data(func(h *pb.FrameHeader) { h.Epoch = 4 }, 4)}, ErrEpoch, -1, 0},
		{"wrong total length", []any{data(func(h *pb.FrameHeader) { h.TotalElems = 9 }, 4)}, ErrProtocol, 0, 0},
		{"chunk out of range", []any{data(func(h *pb.FrameHeader) { h.Chunk = 3 }, 4)}, ErrProtocol, 0, 0},
		{"step out of range", []any{data(func(h *pb.FrameHeader) { h.Step = 2 }, 4)}, ErrProtocol, 2, 0},
		{"wrong chunk length", []any{data(nil, 3)}, ErrProtocol, 0, 0},
		{"duplicate chunk", []any{data(nil, 4), data(nil, 4)}, ErrProtocol, 0, 0},
		{"wrong dtype", []any{data(func(h *pb.FrameHeader) { h.Dtype = pb.DType_DTYPE_BF16 }, 4)}, ErrProtocol, 0, 0},
		{"op from the future", []any{data(func(h *pb.FrameHeader) { h.Op = 7 }, 4)}, ErrProtocol, 0, 0},
		{"wrong source rank", []any{data(func(h *pb.FrameHeader) { h.SrcRank = 1 }, 4)}, ErrProtocol, -1, 0},
		{"garbage bytes", []any{rawFrame("\x00\x01garbage that is not a frame")}, ErrFrame, -1, 0},
		{"hello again", []any{&outFrame{hdr: &pb.FrameHeader{Kind: pb.Kind_KIND_HELLO, Epoch: 5}}}, ErrProtocol, -1, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.HopTimeout = time.Second
			fp, real := newFakePred(t, cfg)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			start := time.Now()
			h := real.Start(make([]float32, length), Sum)
			for _, f := range c.frames {
				fp.send(t, f)
			}
			checkPeerFailure(t, h.Wait(ctx), time.Since(start), c.want, c.step, c.wantDelay)
		})
	}
}

// TestStashBounded: a predecessor may run one collective ahead of this
// rank, and no further: frames beyond that collective's buffer, frames
// disagreeing on its length, or a buffer longer than MaxElems are refused
// naming the predecessor, before anything is applied.
func TestStashBounded(t *testing.T) {
	checkNoLeaks(t)
	const length = 8
	frame := func(step, chunk, elems int, total uint64) *outFrame {
		h := &pb.FrameHeader{Kind: pb.Kind_KIND_DATA, Epoch: 5, SrcRank: 0, WorldSize: 2, Op: 1,
			Step: uint32(step), Chunk: uint32(chunk), TotalElems: total, Dtype: pb.DType_DTYPE_F32, Elems: uint32(elems)}
		return &outFrame{hdr: h, inline: make([]byte, elems*4)}
	}
	for _, c := range []struct {
		name   string
		frames []any
	}{
		// Two of these are all of an 8-element buffer; a third is more.
		{"more than one collective", []any{frame(0, 0, 4, length), frame(1, 0, 4, length), frame(2, 0, 4, length)}},
		{"lengths disagree", []any{frame(0, 0, 4, length), frame(1, 0, 4, 1<<20)}},
		{"longer than MaxElems", []any{frame(0, 0, 4, 1<<31)}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := testConfig()
			cfg.HopTimeout = time.Second
			cfg.MaxElems = 1 << 30
			fp, real := newFakePred(t, cfg)
			for _, f := range c.frames {
				fp.send(t, f)
			}
			time.Sleep(100 * time.Millisecond) // the frames arrive before the collective starts: stashed
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err := real.Start(make([]float32, length), Sum).Wait(ctx)
			var pe *PeerError
			if !errors.Is(err, ErrProtocol) || !errors.As(err, &pe) || pe.Rank != 0 {
				t.Fatalf("err = %v, want a PeerError blaming rank 0 for a protocol violation", err)
			}
			t.Log(err)
		})
	}
}

// checkPeerFailure: err is a *PeerError wrapping want that blames rank 0
// (and step, unless step < 0), returned within 3 s after wantDelay.
func checkPeerFailure(t *testing.T, err error, el time.Duration, want error, step int, wantDelay time.Duration) *PeerError {
	t.Helper()
	var pe *PeerError
	if !errors.Is(err, want) || !errors.As(err, &pe) {
		t.Fatalf("err = %v, want a PeerError wrapping %v", err, want)
	}
	if pe.Rank != 0 {
		t.Errorf("blames rank %d, want 0: %v", pe.Rank, err)
	}
	if step >= 0 && pe.Step != step {
		t.Errorf("names step %d, want %d: %v", pe.Step, step, err)
	}
	if el < wantDelay || el > wantDelay+3*time.Second {
		t.Errorf("failed after %v, want within [%v, %v]", el, wantDelay, wantDelay+3*time.Second)
	}
	t.Logf("%v: %v", el.Round(time.Millisecond), err)
	return pe
}

// TestStrangerRefused: a process that is not the predecessor cannot inject
// a stream, and the ring keeps working.
func TestStrangerRefused(t *testing.T) {
	checkNoLeaks(t)
	rings := newRings(t, 3, nil)
	conn, err := grpc.NewClient(rings[1].Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := conn.NewStream(ctx, &pb.Ring_ServiceDesc.Streams[0], "/"+pb.Ring_ServiceDesc.ServiceName+"/Push", grpc.ForceCodecV2(frameCodec{}))
	if err != nil {
		t.Fatal(err)
	}
	_ = s.SendMsg(&outFrame{hdr: &pb.FrameHeader{Kind: pb.Kind_KIND_HELLO, Epoch: 4, SrcRank: 2, WorldSize: 3, Streams: 1}})
	err = fromStatus(s.RecvMsg(&pb.PushSummary{}))
	if !errors.Is(err, ErrEpoch) {
		t.Fatalf("stranger got %v, want ErrEpoch", err)
	}
	in := seededInputs(3, 3, 5000)
	checkResults(t, in, allReduceAll(t, rings, in, Sum), Sum, false)
}

var _ = net.IPv4len
