package allreduce

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/bmojo/bmojo/kernels"
	pb "github.com/bmojo/bmojo/proto/allreducepb"
)

// Op says how the ranks' buffers are combined.
type Op int

const (
	// Sum leaves every rank with the element-wise sum.
	Sum Op = iota
	// Avg leaves every rank with the element-wise sum divided by N.
	Avg
)

// Ring is one rank of a ring all-reduce. Collectives run one at a time in
// the order they were started; every rank must start the same collectives
// (same lengths and ops) in the same order. After any failure the Ring is
// broken for good: every pending and later collective returns the first
// error, and the caller re-forms the ring with a new epoch.
type Ring struct {
	cfg              Config
	n, rank          int
	pred, succ       int
	log              hclog.Logger
	dtype            pb.DType
	chunkElems       int
	graceAfterExpiry time.Duration
	host             string // hostIdentity(), "" when unknown (no shared memory)

	srv   *grpc.Server
	lis   net.Listener
	conns []*grpc.ClientConn // to the successor
	outs  []*outStream       // every stream to the successor, for shutdown
	data  []*outStream       // gRPC data streams (none on a shared-memory hop)
	ctl   *outStream         // control stream: aborts; a shared-memory hop's only stream
	// shmOut is the successor hop's shared memory (nil: gRPC); set by
	// Connect. shmIn is the predecessor hop's, set (under mu) when its
	// offer is accepted. Both are unmapped by Close.
	shmOut, shmIn *shmRegion
	// sockOut is the successor hop's data sockets (nil: not a socket
	// hop), set by Connect; sockSeq numbers each one's chunks (its
	// sender's alone). sockIn is the predecessor hop's, registered (under
	// mu) when its offer is accepted. sockAll holds the connections we
	// dialled, under any TLS, for fail and Close to close; sockLis is the
	// listener that sorts data sockets from gRPC connections (Transport
	// "socket" only).
	sockOut  []net.Conn
	sockSeq  []uint64
	sockRace []unsafe.Pointer // -race builds only (sock_race.go)
	sockIn   *sockInbound
	sockAll  []net.Conn
	sockLis  *sockListener

	mu       sync.Mutex
	cur      *opState
	lastOp   uint64
	stash    map[uint64][]*inFrame
	stashed  int64 // elements in stash, all of one collective (lastOp+1)
	inCount  int
	inWant   int
	inReady  chan struct{}
	inDone   bool          // inReady is closed
	opCh     chan struct{} // closed and replaced whenever a collective starts
	failed   error
	failedCh chan struct{}
	refused  error // last stream refused without breaking the ring
	closed   bool
	queue    []*Handle
	queueSig chan struct{}
	nextOp   uint64

	stopCh chan struct{}
	wg     sync.WaitGroup
	outWG  sync.WaitGroup // goroutines watching the outgoing streams
	active bool           // a collective is running

	stats Stats
}

// Stats counts traffic; read it with (*Ring).Stats.
type Stats struct {
	FramesSent, FramesRecv atomic.Uint64
	BytesSent, BytesRecv   atomic.Uint64
	Ops                    atomic.Uint64
}

type outStream struct {
	conn   *grpc.ClientConn
	stream grpc.ClientStream
	cancel context.CancelFunc
}

// New creates rank cfg.Rank of a ring and starts serving its predecessor's
// streams on lis (or on a new listener at Peers[Rank] when lis is nil).
// Call Connect before the first collective.
func New(cfg Config, lis net.Listener) (*Ring, error) {
	cfg.fillDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	n := len(cfg.Peers)
	r := &Ring{
		cfg:        cfg,
		n:          n,
		rank:       cfg.Rank,
		pred:       mod(cfg.Rank-1, n),
		succ:       mod(cfg.Rank+1, n),
		log:        cfg.Logger.Named("allreduce").With("rank", cfg.Rank, "epoch", cfg.Epoch),
		dtype:      pb.DType_DTYPE_F32,
		chunkElems: cfg.ChunkBytes / 4,
		host:       cfg.hostID,
		stash:      map[uint64][]*inFrame{},
		inReady:    make(chan struct{}),
		opCh:       make(chan struct{}),
		failedCh:   make(chan struct{}),
		queueSig:   make(chan struct{}, 1),
		stopCh:     make(chan struct{}),
	}
	// After a hop deadline expires, wait this long for an abort from
	// upstream before blaming the predecessor: a stall further up the ring
	// expires there first, and its report names the right rank.
	r.graceAfterExpiry = min(cfg.HopTimeout/2, 2*time.Second)
	if cfg.WireBF16 {
		r.dtype = pb.DType_DTYPE_BF16
	}
	if r.host == "" {
		r.host = hostIdentity()
	}
	if n > 1 {
		if lis == nil {
			var err error
			network, address := splitAddr(cfg.Peers[cfg.Rank])
			if lis, err = net.Listen(network, address); err != nil {
				return nil, fmt.Errorf("allreduce: rank %d listen on %s: %w", cfg.Rank, cfg.Peers[cfg.Rank], err)
			}
		}
		opts := []grpc.ServerOption{
			grpc.ForceServerCodecV2(frameCodec{}),
			experimental.BufferPool(framePool),
			grpc.MaxRecvMsgSize(cfg.ChunkBytes + 4096),
			grpc.StaticStreamWindowSize(cfg.WindowBytes),
			grpc.StaticConnWindowSize(cfg.WindowBytes),
			grpc.ReadBufferSize(cfg.readBuffer()),
			grpc.WriteBufferSize(cfg.writeBuffer()),
			grpc.MaxConcurrentStreams(uint32(cfg.Streams + 8)),
		}
		if cfg.ServerTLS != nil {
			opts = append(opts, grpc.Creds(credentials.NewTLS(cfg.ServerTLS)))
		}
		r.lis = lis
		r.srv = grpc.NewServer(opts...)
		pb.RegisterRingServer(r.srv, &ringServer{r: r})
		serve := lis
		if cfg.Transport == TransportSocket {
			// Data sockets arrive on the same address; gRPC gets the rest.
			r.sockLis = newSockListener(r, lis)
			serve = r.sockLis
			r.wg.Add(1)
			go r.sockLis.run()
		}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			_ = r.srv.Serve(serve) // returns when Close stops the server
		}()
	} else {
		close(r.inReady)
		r.inDone = true
	}
	r.wg.Add(1)
	go r.executor()
	return r, nil
}

// Addr is the address the ring serves on (nil for a 1-rank ring).
func (r *Ring) Addr() net.Addr {
	if r.lis == nil {
		return nil
	}
	return r.lis.Addr()
}

// Size is the number of ranks.
func (r *Ring) Size() int { return r.n }

// Stats returns the traffic counters.
func (r *Ring) Stats() *Stats { return &r.stats }

// Connect opens the streams to the successor (waiting for it to come up)
// and waits until the predecessor's streams have arrived. ctx bounds both.
//
// With Transport "auto" the first stream's HELLO offers a shared-memory
// file (shm.go), with "socket" data sockets (sock.go); if the successor
// accepts, that stream is the only one and chunk payloads go through the
// file or the sockets. Otherwise Streams data streams and a control stream
// are opened as usual.
func (r *Ring) Connect(ctx context.Context) error {
	if r.n == 1 {
		return nil
	}
	addr := r.cfg.Peers[r.succ]
	var offer *shmRegion
	if r.shmCapable() && r.host != "" {
		reg, err := createShmRegion(newShmGeometry(r.cfg), r.cfg.Epoch, r.rank, r.n)
		if err != nil {
			r.log.Info("same-host path unavailable, using grpc", "error", err)
		} else {
			offer = reg
		}
	}
	k := r.cfg.Streams
	hello := func(i int) *pb.FrameHeader {
		return &pb.FrameHeader{
			Kind: pb.Kind_KIND_HELLO, Epoch: r.cfg.Epoch, SrcRank: uint32(r.rank),
			WorldSize: uint32(r.n), Stream: uint32(i), Streams: uint32(k + 1),
			Elems: uint32(r.chunkElems), // the chunk size, which every rank must share
		}
	}
	h0 := hello(0)
	h0.Host = r.host
	if offer != nil {
		h0.ShmPath, h0.ShmNonce = offer.path, offer.nonce
	}
	var sockNonce []byte
	if r.cfg.Transport == TransportSocket {
		var err error
		if sockNonce, err = newSockNonce(); err != nil {
			return err
		}
		h0.SockNonce, h0.Sockets = sockNonce, uint32(k)
	}
	var req metadata.MD
	if offer != nil && r.cfg.Transport == TransportCUDAIPC {
		req = metadata.Pairs(ipcMetaKey, "offer") // ipc.go
	}
	conn0, err := r.dial(addr)
	var s0 *outStream
	var md metadata.MD
	if err == nil {
		s0, md, err = r.openStream(ctx, conn0, 0, h0, req)
	}
	if offer != nil {
		// Whatever the answer, the name goes now: the successor has
		// mapped the file if it accepted, and nobody else needs it.
		offer.unlink()
		if ans := md.Get(shmMetaKey); err == nil && len(ans) == 1 && ans[0] == "ok" {
			if req != nil {
				r.ipcOpen(offer, md)
			}
			r.mu.Lock()
			r.ctl, r.shmOut = s0, offer
			r.mu.Unlock()
			r.log.Debug("successor hop over shared memory", "queues", offer.geo.queues, "slots", offer.geo.slots)
			return r.awaitInbound(ctx)
		} else if err == nil {
			r.log.Debug("successor declined the same-host path, using grpc", "answer", ans)
		}
		offer.unmap()
	}
	if err != nil {
		return err
	}
	if sockNonce != nil {
		ans := md.Get(sockMetaKey)
		if len(ans) == 1 && ans[0] == "ok" {
			conns, err := r.dialSockets(ctx, addr, sockNonce, k)
			if err != nil {
				return err
			}
			r.mu.Lock()
			r.ctl, r.sockOut, r.sockSeq = s0, conns, make([]uint64, k)
			for i := range conns {
				r.sockRace = append(r.sockRace, sockRaceToken(sockNonce, i))
			}
			r.mu.Unlock()
			r.log.Debug("successor hop over data sockets", "sockets", k)
			return r.awaitInbound(ctx)
		}
		r.log.Debug("successor declined the socket path, using grpc", "answer", ans)
	}
	data := []*outStream{s0}
	for i := 1; i <= k; i++ {
		conn := conn0 // the control stream shares the first connection
		if i < k {
			if conn, err = r.dial(addr); err != nil {
				return err
			}
		}
		st, _, err := r.openStream(ctx, conn, i, hello(i), nil)
		if err != nil {
			return err
		}
		if i < k {
			data = append(data, st)
		} else {
			r.mu.Lock()
			r.data, r.ctl = data, st
			r.mu.Unlock()
		}
	}
	return r.awaitInbound(ctx)
}

// dial makes one connection to the successor.
func (r *Ring) dial(addr string) (*grpc.ClientConn, error) {
	creds := insecure.NewCredentials()
	if tc := r.successorTLS(); tc != nil {
		creds = credentials.NewTLS(tc)
	}
	c, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(creds),
		grpc.WithStaticStreamWindowSize(r.cfg.WindowBytes),
		grpc.WithStaticConnWindowSize(r.cfg.WindowBytes),
		grpc.WithReadBufferSize(r.cfg.readBuffer()),
		grpc.WithWriteBufferSize(r.cfg.writeBuffer()),
		grpc.WithDisableRetry(), // retries would buffer payloads we hand over zero-copy
		// Ranks of a new epoch come up within milliseconds of each
		// other; gRPC's default first reconnect after 1 s would add
		// a second to every ring re-formation.
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{
			BaseDelay: 20 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second,
		}, MinConnectTimeout: 5 * time.Second}),
		experimental.WithBufferPool(framePool),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(r.cfg.ChunkBytes+4096)),
	)
	if err != nil {
		return nil, fmt.Errorf("allreduce: rank %d dial successor rank %d at %s: %w", r.rank, r.succ, addr, err)
	}
	r.mu.Lock()
	r.conns = append(r.conns, c)
	r.mu.Unlock()
	return c, nil
}

// openStream opens stream i to the successor on conn, with req (if any) as
// its request metadata, sends hello and waits for the successor to accept
// it; it returns the successor's response headers.
func (r *Ring) openStream(ctx context.Context, conn *grpc.ClientConn, i int, hello *pb.FrameHeader, req metadata.MD) (*outStream, metadata.MD, error) {
	addr := r.cfg.Peers[r.succ]
	sctx, cancel := context.WithCancel(context.Background())
	if req != nil {
		sctx = metadata.NewOutgoingContext(sctx, req)
	}
	// Open the stream under ctx's deadline, but keep it alive past it.
	type res struct {
		s   grpc.ClientStream
		err error
	}
	ch := make(chan res, 1)
	go func() {
		s, err := conn.NewStream(sctx, &pb.Ring_ServiceDesc.Streams[0], "/"+pb.Ring_ServiceDesc.ServiceName+"/Push",
			grpc.ForceCodecV2(frameCodec{}), grpc.WaitForReady(true))
		ch <- res{s, err}
	}()
	var rs res
	select {
	case rs = <-ch:
	case <-ctx.Done():
		cancel()
		rs = <-ch
		if rs.err == nil {
			rs.err = ctx.Err()
		}
	}
	if rs.err != nil {
		cancel()
		return nil, nil, fmt.Errorf("allreduce: rank %d open stream %d to successor rank %d at %s: %w", r.rank, i, r.succ, addr, rs.err)
	}
	os := &outStream{conn: conn, stream: rs.s, cancel: cancel}
	r.mu.Lock()
	r.outs = append(r.outs, os)
	r.mu.Unlock()
	if err := rs.s.SendMsg(&outFrame{hdr: hello}); err != nil {
		return nil, nil, fmt.Errorf("allreduce: rank %d hello to successor rank %d on stream %d: %w", r.rank, r.succ, i, fromStatus(rs.s.RecvMsg(&pb.PushSummary{})))
	}
	// The successor sends headers once it accepts the hello. Until
	// then gRPC keeps every message for a transparent retry, which
	// would pin our zero-copy payloads; after it, the stream is
	// committed and payloads are released as soon as they are written.
	md, _ := rs.s.Header()
	if md == nil {
		err := rs.s.RecvMsg(&pb.PushSummary{})
		return nil, nil, &PeerError{Rank: r.succ, Via: r.rank, Step: -1, Chunk: -1,
			Err: fmt.Errorf("successor at %s refused stream %d: %w", addr, i, fromStatus(err))}
	}
	// The successor answers only by ending the stream: with an error
	// when it refuses us (wrong epoch, rank or world size), or when
	// its process dies. Either breaks the ring.
	r.wg.Add(1)
	r.outWG.Add(1)
	go func(i int, s grpc.ClientStream) {
		defer r.wg.Done()
		defer r.outWG.Done()
		err := s.RecvMsg(&pb.PushSummary{})
		if err == nil || r.isStopping() {
			// nil: the successor saw our half-close and confirmed it
			// has every frame (graceful Close).
			return
		}
		r.fail(&PeerError{Rank: r.succ, Via: r.rank, Step: -1, Chunk: -1,
			Err: fmt.Errorf("successor ended stream %d: %w", i, fromStatus(err))})
	}(i, rs.s)
	return os, md, nil
}

// awaitInbound waits until the predecessor's streams have all arrived.
func (r *Ring) awaitInbound(ctx context.Context) error {
	select {
	case <-r.inReady:
		return nil
	case <-r.failedCh:
		return r.failure()
	case <-ctx.Done():
		r.mu.Lock()
		refused := r.refused
		r.mu.Unlock()
		if refused != nil {
			return fmt.Errorf("allreduce: rank %d waiting for streams from predecessor rank %d: %w (last refused: %w)", r.rank, r.pred, ctx.Err(), refused)
		}
		return fmt.Errorf("allreduce: rank %d waiting for streams from predecessor rank %d: %w", r.rank, r.pred, ctx.Err())
	}
}

// Transport reports how this rank's two hops carry data: TransportCUDAIPC,
// TransportShm, TransportSocket or TransportGRPC, or "" before Connect has
// settled it (and on a 1-rank ring). A predecessor's hop reads cuda-ipc once
// the predecessor has opened our device slots, which it does before its
// Connect returns (ours may return first).
func (r *Ring) Transport() (toSuccessor, fromPredecessor string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case r.shmOut != nil && r.shmOut.ipc != nil:
		toSuccessor = TransportCUDAIPC
	case r.shmOut != nil:
		toSuccessor = TransportShm
	case r.sockOut != nil:
		toSuccessor = TransportSocket
	case r.ctl != nil:
		toSuccessor = TransportGRPC
	}
	switch {
	case r.shmIn != nil && r.shmIn.ipc != nil && r.shmIn.ipcFlag() != nil && r.shmIn.ipcFlag().Load() == 1:
		fromPredecessor = TransportCUDAIPC
	case r.shmIn != nil:
		fromPredecessor = TransportShm
	case r.sockIn != nil && r.inDone:
		fromPredecessor = TransportSocket
	case r.inDone && r.n > 1:
		fromPredecessor = TransportGRPC
	}
	return toSuccessor, fromPredecessor
}

// Handle is a collective in flight (of a Ring or a Hier).
type Handle struct {
	rank int // for messages: the rank that started it
	op   uint64
	buf  []float32
	dev  kernels.Buffer // a device collective's buffer (ipc.go); buf is nil then
	kind Op
	part part
	done chan struct{}
	err  error
}

// Start begins an all-reduce of buf in place and returns at once; buf belongs
// to the ring until the handle is done. Collectives run in Start order.
func (r *Ring) Start(buf []float32, op Op) *Handle { return r.start(buf, op, partAll) }

// StartReduceScatter begins the first half of an all-reduce: when the
// handle is done, this rank's segment of buf, Owned(len(buf)), holds the
// reduction (op) of every rank's segment, bitwise identical to what an
// all-reduce would leave there (rounded to bfloat16 with WireBF16); the
// rest of buf holds partial sums and is to be ignored.
func (r *Ring) StartReduceScatter(buf []float32, op Op) *Handle {
	return r.start(buf, op, partReduceScatter)
}

// StartAllGather begins the second half of an all-reduce: every rank
// contributes its segment Owned(len(buf)) of buf, and when the handle is
// done every rank's buf holds every rank's segment, bit for bit. With
// WireBF16 the owned segment is first rounded to bfloat16 in place (what
// the others receive), so every rank ends with the same bits.
func (r *Ring) StartAllGather(buf []float32) *Handle { return r.start(buf, Sum, partAllGather) }

// ReduceScatter is StartReduceScatter and waiting for it; see AllReduce
// for what ctx ending does.
func (r *Ring) ReduceScatter(ctx context.Context, buf []float32, op Op) error {
	return r.await(ctx, r.StartReduceScatter(buf, op))
}

// AllGather is StartAllGather and waiting for it; see AllReduce for what
// ctx ending does.
func (r *Ring) AllGather(ctx context.Context, buf []float32) error {
	return r.await(ctx, r.StartAllGather(buf))
}

// Owned is the element range [lo,hi) of an n-element buffer that this rank
// holds fully reduced after a reduce-scatter and contributes to an
// all-gather: segment Plan.Owned() of the ring's plan. Ranks' ranges tile
// the buffer; some are empty when n is smaller than the ring.
func (r *Ring) Owned(n int) (lo, hi int) {
	p := Plan{N: r.n, Rank: r.rank, Length: max(n, 0)}
	return p.Segment(p.Owned())
}

func (r *Ring) start(buf []float32, op Op, k part) *Handle {
	return r.startHandle(&Handle{rank: r.rank, buf: buf, kind: op, part: k, done: make(chan struct{})})
}

// startHandle numbers h and queues it.
func (r *Ring) startHandle(h *Handle) *Handle {
	r.mu.Lock()
	r.nextOp++
	h.op = r.nextOp
	if r.closed {
		r.mu.Unlock()
		h.err = fmt.Errorf("allreduce: rank %d op %d: %w", r.rank, h.op, ErrClosed)
		close(h.done)
		return h
	}
	r.queue = append(r.queue, h)
	r.mu.Unlock()
	select {
	case r.queueSig <- struct{}{}:
	default:
	}
	return h
}

// Done is closed when the collective has finished (successfully or not).
func (h *Handle) Done() <-chan struct{} { return h.done }

// Wait blocks until the collective finishes and returns its error. If ctx
// ends first it returns ctx's error and the collective keeps running; the
// buffer still belongs to the ring until Done is closed.
func (h *Handle) Wait(ctx context.Context) error {
	select {
	case <-h.done:
		return h.err
	case <-ctx.Done():
		return fmt.Errorf("allreduce: rank %d waiting for op %d: %w", h.rank, h.op, ctx.Err())
	}
}

// AllReduce reduces buf in place across all ranks. If ctx ends first the
// ring is aborted (the other ranks fail too) and AllReduce returns once the
// buffer is no longer in use.
func (r *Ring) AllReduce(ctx context.Context, buf []float32, op Op) error {
	return r.await(ctx, r.Start(buf, op))
}

// await waits for h; if ctx ends first it breaks the ring and waits until
// the buffer is no longer in use.
func (r *Ring) await(ctx context.Context, h *Handle) error {
	select {
	case <-h.done:
		return h.err
	case <-ctx.Done():
		r.fail(fmt.Errorf("allreduce: rank %d op %d abandoned by caller: %w", r.rank, h.op, ctx.Err()))
		<-h.done
		return h.err
	}
}

// Close stops the ring; collectives in flight fail with ErrClosed. A healthy,
// idle ring closes gracefully: Close waits (at most min(HopTimeout, 5 s)
// each) until the successor has read everything we sent and the predecessor
// has closed its streams to us, so ranks should close at about the same time.
func (r *Ring) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	idle := r.failed == nil && !r.active && len(r.queue) == 0 && r.ctl != nil
	outs, conns := r.outs, r.conns
	r.mu.Unlock()
	bound := min(r.cfg.HopTimeout, 5*time.Second)
	if idle {
		// Graceful: half-close our streams and wait (bounded) until the
		// successor confirms it has read everything, so our last frames
		// are not lost in a connection torn down under them.
		for _, o := range outs {
			_ = o.stream.CloseSend()
		}
		done := make(chan struct{})
		go func() { r.outWG.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(bound):
		}
	}
	var drained chan struct{}
	if idle && r.srv != nil {
		// Likewise wait (bounded) for the predecessor to half-close its
		// streams to us: it may still be finishing a collective that
		// needs nothing more from us, and stopping our server under it
		// would fail that collective.
		drained = make(chan struct{})
		go func() { r.srv.GracefulStop(); close(drained) }()
		select {
		case <-drained:
		case <-time.After(bound):
		}
	}
	r.fail(fmt.Errorf("allreduce: rank %d: %w", r.rank, ErrClosed))
	close(r.stopCh)
	r.closeSockets(true)
	for _, o := range outs {
		o.cancel()
	}
	if r.srv != nil {
		r.srv.Stop()
	}
	if r.sockLis != nil {
		_ = r.sockLis.Close() // Stop closed it, unless Serve never ran
	}
	if drained != nil {
		<-drained
	}
	for _, c := range conns {
		_ = c.Close()
	}
	r.wg.Wait()
	r.mu.Lock()
	for _, fs := range r.stash {
		for _, f := range fs {
			f.release()
		}
	}
	r.stash = nil
	// Every goroutine that touched the shared memory has returned.
	for _, reg := range []*shmRegion{r.shmOut, r.shmIn} {
		if reg != nil {
			r.ipcRelease(reg)
			reg.unmap()
		}
	}
	r.mu.Unlock()
	r.log.Debug("ring closed")
	return nil
}

// Err is nil while the ring can still reduce, else why it cannot: the
// error that broke it, or ErrClosed. Long local work between collectives
// (an evaluation pass) polls it to stop early instead of finishing work
// whose sum can no longer be taken.
func (r *Ring) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case r.failed != nil:
		return r.failed
	case r.closed:
		return fmt.Errorf("allreduce: rank %d: %w", r.rank, ErrClosed)
	}
	return nil
}

func (r *Ring) isStopping() bool {
	select {
	case <-r.stopCh:
		return true
	default:
		return false
	}
}

func (r *Ring) failure() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}

// blameOutside, as an ABORT's blame rank, says the failure happened outside
// this ring: in the other ring of a hierarchical collective (Hier), which
// names the culprit in its own ranks. Receivers pass it on and blame no
// rank of theirs.
const blameOutside = -2

// fail breaks the ring with err (the first error wins), tells the successor
// so that the failure travels around the ring, and unblocks everything. The
// abort blames the rank a *PeerError names, else the predecessor (as the
// successor sees it).
func (r *Ring) fail(err error) {
	blame := int32(-1)
	var pe *PeerError
	if errors.As(err, &pe) {
		blame = int32(pe.Rank)
	}
	r.failBlame(err, blame)
}

// failOutside breaks the ring for a failure outside it (see blameOutside):
// the abort names no rank of this ring.
func (r *Ring) failOutside(err error) { r.failBlame(err, blameOutside) }

func (r *Ring) failBlame(err error, blame int32) {
	r.mu.Lock()
	if r.failed != nil {
		r.mu.Unlock()
		return
	}
	r.failed = err
	close(r.failedCh)
	closing := r.closed
	ctl, data := r.ctl, r.data
	r.mu.Unlock()
	if closing {
		return
	}
	r.log.Warn("ring broken", "error", err)
	if ctl != nil {
		hdr := &pb.FrameHeader{Kind: pb.Kind_KIND_ABORT, Epoch: r.cfg.Epoch, SrcRank: uint32(r.rank),
			WorldSize: uint32(r.n), BlameRank: blame, Reason: err.Error()}
		// Best effort, bounded: a dead successor cannot take it.
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = ctl.stream.SendMsg(&outFrame{hdr: hdr})
		}()
		select {
		case <-done:
		case <-time.After(time.Second):
		}
	}
	// Unblock senders stuck on flow control towards a stalled successor
	// (shared-memory senders watch failedCh), and data socket readers and
	// writers.
	for _, o := range data {
		o.cancel()
	}
	r.closeSockets(false)
}

func (r *Ring) executor() {
	defer r.wg.Done()
	for {
		r.mu.Lock()
		var h *Handle
		if len(r.queue) > 0 {
			h = r.queue[0]
			r.queue = r.queue[1:]
		}
		closed := r.closed
		r.mu.Unlock()
		if h == nil {
			if closed {
				return
			}
			select {
			case <-r.queueSig:
			case <-r.stopCh:
			}
			continue
		}
		r.mu.Lock()
		r.active = true
		r.mu.Unlock()
		h.err = r.run(h)
		r.mu.Lock()
		r.active = false
		r.mu.Unlock()
		r.stats.Ops.Add(1)
		close(h.done)
	}
}

// opState is the bookkeeping of one collective on this rank.
type opState struct {
	id   uint64
	buf  []float32
	dev  kernels.Buffer // instead of buf: a device collective (ipc.go)
	kind Op
	plan Plan
	part part
	// first and end bound the steps this collective runs (Plan.StepRange).
	first, end int
	done       []chan struct{} // per (step, chunk): received and applied
	got        []atomic.Bool
	// prep[Index(s, j)] is the bf16 payload to send at step s+1 for chunk
	// j, written by apply before done[Index(s, j)] is closed.
	prep [][]byte
	// pins counts payloads gRPC still holds, plus one for the senders
	// while they run; released is closed when it drops to zero.
	pins     atomic.Int64
	released chan struct{}
}

func (op *opState) pin() { op.pins.Add(1) }

func (op *opState) unpin() {
	if op.pins.Add(-1) == 0 {
		close(op.released)
	}
}

func (r *Ring) run(h *Handle) error {
	if r.n == 1 {
		// x/1 == x: nothing to do, and no rounding since nothing is on a wire.
		return r.failure()
	}
	length := len(h.buf)
	if h.dev != nil {
		if !r.ipcNative() {
			return r.runStaged(h)
		}
		length = h.dev.Len()
	}
	plan, err := NewPlan(r.n, r.rank, length, r.chunkElems)
	if err != nil {
		return err
	}
	op := &opState{id: h.op, buf: h.buf, dev: h.dev, kind: h.kind, plan: plan, part: h.part, released: make(chan struct{})}
	op.first, op.end = plan.StepRange(h.part)
	if h.part == partAllGather && r.dtype == pb.DType_DTYPE_BF16 {
		// The others receive our segment rounded; keep ours equal. (After
		// a reduce-scatter it is bf16 already, and rounding is idempotent.)
		lo, hi := plan.Segment(plan.Owned())
		roundBF16(h.buf[lo:hi])
	}
	if r.dtype == pb.DType_DTYPE_BF16 {
		op.prep = make([][]byte, plan.Steps()*plan.Chunks)
	}
	op.pins.Store(1)
	total := plan.Steps() * plan.Chunks
	op.done = make([]chan struct{}, total)
	for i := range op.done {
		op.done[i] = make(chan struct{})
	}
	op.got = make([]atomic.Bool, total)

	r.mu.Lock()
	if r.failed != nil {
		r.mu.Unlock()
		return r.failed
	}
	r.cur, r.lastOp = op, op.id
	close(r.opCh) // wakes the shared-memory consumers
	r.opCh = make(chan struct{})
	stashed := r.stash[op.id]
	delete(r.stash, op.id)
	r.stashed = 0
	r.mu.Unlock()
	for _, f := range stashed {
		if err := r.apply(op, f); err != nil {
			r.fail(err)
		}
	}

	var senders sync.WaitGroup
	send, lanes := r.sendLoop, len(r.data)
	switch {
	case r.shmOut != nil:
		send, lanes = r.shmSendLoop, len(r.shmOut.queues)
	case r.sockOut != nil:
		send, lanes = r.sockSendLoop, len(r.sockOut)
	}
	for k := 0; k < lanes; k++ {
		senders.Add(1)
		go func(k int) {
			defer senders.Done()
			if err := send(op, k); err != nil {
				r.fail(err)
			}
		}(k)
	}
	err = r.awaitRecv(op)
	senders.Wait()
	if err == nil {
		err = r.failure()
	}
	// gRPC may still hold our last payloads (views of buf) in its write
	// queue; buf is the caller's again only once they are copied out.
	op.unpin()
	select {
	case <-op.released:
	case <-r.failedCh:
		// The streams are cancelled, so nothing more is copied out of
		// buf; gRPC does not always hand back what it had queued.
		select {
		case <-op.released:
		case <-time.After(100 * time.Millisecond):
		}
	}
	return err
}

// awaitRecv waits for every chunk of every step, in schedule order, each
// within the hop deadline.
func (r *Ring) awaitRecv(op *opState) error {
	timer := time.NewTimer(r.cfg.HopTimeout)
	defer timer.Stop()
	p := op.plan
	for s := op.first; s < op.end; s++ {
		for j := 0; j < p.Chunks; j++ {
			select {
			case <-op.done[p.Index(s, j)]:
				if !timer.Stop() {
					<-timer.C
				}
				timer.Reset(r.cfg.HopTimeout)
			case <-r.failedCh:
				return r.failure()
			case <-timer.C:
				select {
				case <-r.failedCh:
					return r.failure()
				case <-time.After(r.graceAfterExpiry):
				}
				r.fail(&PeerError{Rank: r.pred, Via: r.rank, Op: op.id, Step: s, Chunk: j,
					Err: fmt.Errorf("segment %d not received within %v: %w", p.RecvSegment(s), r.cfg.HopTimeout, ErrHopTimeout)})
				return r.failure()
			}
		}
	}
	return nil
}

// errStopSend ends a sends walk without an error of its own: the ring has
// failed, and the failure is reported where it happened.
var errStopSend = errors.New("allreduce: ring failed")

// sends walks what one send lane of op sends: the chunks j ≡ lane (mod
// lanes) of every step, in order, calling send(s, j, lo, hi) for each
// (elements [lo,hi) of the buffer) once the previous step's chunk j has
// arrived here, so that its values are final. It returns nil when the ring
// fails meanwhile or send returns errStopSend, else send's first error.
// Every transport's send loop walks the schedule through it.
func (r *Ring) sends(op *opState, lane, lanes int, send func(s, j, lo, hi int) error) error {
	p := op.plan
	for s := op.first; s < op.end; s++ {
		for j := lane; j < p.Chunks; j += lanes {
			if s > op.first {
				select {
				case <-op.done[p.Index(s-1, j)]:
				case <-r.failedCh:
					return nil
				}
			}
			lo, hi := p.Chunk(p.SendSegment(s), j)
			if err := send(s, j, lo, hi); err != nil {
				if errors.Is(err, errStopSend) {
					return nil
				}
				return err
			}
		}
	}
	return nil
}

// sendLoop sends the chunks j ≡ k (mod Streams) of every step on data stream k.
func (r *Ring) sendLoop(op *opState, k int) error {
	p := op.plan
	st := r.data[k].stream
	return r.sends(op, k, len(r.data), func(s, j, lo, hi int) error {
		src := op.buf[lo:hi]
		of := &outFrame{hdr: &pb.FrameHeader{
			Kind: pb.Kind_KIND_DATA, Epoch: r.cfg.Epoch, SrcRank: uint32(r.rank), WorldSize: uint32(r.n),
			Op: op.id, Step: uint32(s), Chunk: uint32(j), TotalElems: uint64(p.Length),
			Dtype: r.dtype, Elems: uint32(len(src)),
		}}
		nbytes := len(src) * dtypeSize(r.dtype)
		var raw []byte
		if r.dtype == pb.DType_DTYPE_BF16 {
			if s > op.first {
				// Made by apply while the values were in registers.
				raw = op.prep[p.Index(s-1, j)]
				op.prep[p.Index(s-1, j)] = nil
			} else {
				raw = getWireBuf(nbytes)
				toBF16(raw, src)
			}
		} else {
			raw = f32Bytes(src)
		}
		if mem.IsBelowBufferPoolingThreshold(nbytes) {
			// Small: copy next to the header, nothing to hand back later.
			of.inline = append([]byte(nil), raw...)
			if r.dtype == pb.DType_DTYPE_BF16 {
				putWireBuf(raw)
			}
		} else {
			op.pin()
			rel := &releaser{op: op, pooled: r.dtype == pb.DType_DTYPE_BF16}
			of.payload = mem.NewBuffer(&raw, rel)
		}
		if err := st.SendMsg(of); err != nil {
			if of.payload != nil { // never reached the codec
				of.payload.Free()
			}
			// A successor that failed for its own reasons ends our
			// stream after sending its ABORT around the ring, which
			// names the culprit: give that a moment to win (without
			// it TestRingLengthMismatch/grpc blamed the successor in
			// about one run of 200).
			return r.afterGrace(&PeerError{Rank: r.succ, Via: r.rank, Op: op.id, Step: s, Chunk: j,
				Err: fmt.Errorf("send on stream %d: %v: %w", k, err, ErrPeerFailed)})
		}
		r.stats.FramesSent.Add(1)
		r.stats.BytesSent.Add(uint64(nbytes))
		return nil
	})
}

// releaser is the mem.BufferPool of one outgoing payload: gRPC "returns"
// the payload to it once the bytes are copied out, which is when the sender
// may reuse the memory.
type releaser struct {
	op     *opState
	pooled bool
}

func (rl *releaser) Get(int) *[]byte { return new([]byte) } // never called for our buffers
func (rl *releaser) Put(b *[]byte) {
	if rl.pooled {
		putWireBuf(*b)
	}
	rl.op.unpin()
}

var wireBufs sync.Pool

func getWireBuf(n int) []byte {
	if p, ok := wireBufs.Get().(*[]byte); ok && cap(*p) >= n {
		return (*p)[:n]
	}
	return make([]byte, n)
}

func putWireBuf(b []byte) { wireBufs.Put(&b) }

// maxStashed bounds the frames kept for a collective this rank has not
// started yet (the predecessor can only be one collective ahead, and only by
// the chunks that do not depend on us).
const maxStashed = 1 << 16

// deliver routes a frame from the predecessor to the collective it belongs to.
func (r *Ring) deliver(f *inFrame, stream int) error {
	h := f.hdr
	if err := r.checkSender(h, fmt.Sprintf("stream %d", stream)); err != nil {
		f.release()
		return err
	}
	switch h.GetKind() {
	case pb.Kind_KIND_ABORT:
		f.release()
		blame := int(h.GetBlameRank())
		if blame == blameOutside {
			// Not a PeerError: no rank of this ring is to blame.
			r.failOutside(fmt.Errorf("allreduce: rank %d: aborted by predecessor rank %d for a failure outside this ring: %s: %w",
				r.rank, r.pred, h.GetReason(), ErrPeerFailed))
			return nil
		}
		if blame < 0 || blame >= r.n {
			blame = r.pred
		}
		r.fail(&PeerError{Rank: blame, Via: r.pred, Op: h.GetOp(), Step: -1, Chunk: -1,
			Err: fmt.Errorf("aborted upstream: %s: %w", h.GetReason(), ErrPeerFailed)})
		return nil
	case pb.Kind_KIND_DATA:
	default:
		f.release()
		return &PeerError{Rank: r.pred, Via: r.rank, Step: -1, Chunk: -1,
			Err: fmt.Errorf("unexpected %v frame on stream %d: %w", h.GetKind(), stream, ErrProtocol)}
	}
	r.mu.Lock()
	op := r.cur
	switch {
	case r.shmIn != nil || r.sockIn != nil:
		hop := map[bool]string{true: "shared-memory", false: "data-socket"}[r.shmIn != nil]
		r.mu.Unlock()
		f.release()
		return &PeerError{Rank: r.pred, Via: r.rank, Op: h.GetOp(), Step: int(h.GetStep()), Chunk: int(h.GetChunk()),
			Err: fmt.Errorf("data frame on stream %d of a %s hop: %w", stream, hop, ErrProtocol)}
	case op != nil && h.GetOp() == op.id:
		r.mu.Unlock()
		return r.apply(op, f)
	case h.GetOp() == r.lastOp+1 && len(r.stash[h.GetOp()]) < maxStashed:
		// The predecessor may run up to one collective ahead of us: at
		// most that collective's buffer, whose length every frame of it
		// announces alike, and never more than MaxElems.
		total := h.GetTotalElems()
		if fs := r.stash[h.GetOp()]; len(fs) > 0 && fs[0].hdr.GetTotalElems() != total ||
			total > uint64(r.cfg.MaxElems) || uint64(r.stashed)+uint64(h.GetElems()) > total {
			stashed := r.stashed
			r.mu.Unlock()
			f.release()
			return &PeerError{Rank: r.pred, Via: r.rank, Op: h.GetOp(), Step: int(h.GetStep()), Chunk: int(h.GetChunk()),
				Err: fmt.Errorf("running ahead with more than one collective: %d elements stashed, a frame of %d more, for a buffer of %d (at most %d): %w",
					stashed, h.GetElems(), total, r.cfg.MaxElems, ErrProtocol)}
		}
		r.stash[h.GetOp()] = append(r.stash[h.GetOp()], f)
		r.stashed += int64(h.GetElems())
		r.mu.Unlock()
		return nil
	default:
		last := r.lastOp
		r.mu.Unlock()
		f.release()
		return &PeerError{Rank: r.pred, Via: r.rank, Op: h.GetOp(), Step: int(h.GetStep()), Chunk: int(h.GetChunk()),
			Err: fmt.Errorf("frame for op %d while at op %d: %w", h.GetOp(), last, ErrProtocol)}
	}
}

// checkSender checks what every frame from the predecessor must carry: this
// ring's epoch and the predecessor's rank. where names the stream or queue.
func (r *Ring) checkSender(h *pb.FrameHeader, where string) error {
	if h.GetEpoch() != r.cfg.Epoch {
		return &PeerError{Rank: r.pred, Via: r.rank, Op: h.GetOp(), Step: -1, Chunk: -1,
			Err: fmt.Errorf("frame of epoch %d on %s, ring is at epoch %d: %w", h.GetEpoch(), where, r.cfg.Epoch, ErrEpoch)}
	}
	if int(h.GetSrcRank()) != r.pred {
		return &PeerError{Rank: r.pred, Via: r.rank, Op: h.GetOp(), Step: -1, Chunk: -1,
			Err: fmt.Errorf("frame claims source rank %d on %s: %w", h.GetSrcRank(), where, ErrProtocol)}
	}
	return nil
}

// admit checks a data frame's header against the collective's plan and
// claims its (step, chunk): it returns the chunk's index and where in the
// buffer its payload goes.
func (r *Ring) admit(op *opState, h *pb.FrameHeader) (int, []float32, error) {
	idx, lo, hi, err := r.admitRange(op, h)
	if err != nil {
		return 0, nil, err
	}
	return idx, op.buf[lo:hi], nil
}

// admitRange is admit returning the element range [lo,hi) of the chunk (a
// device collective has no host buffer).
func (r *Ring) admitRange(op *opState, h *pb.FrameHeader) (idx, lo, hi int, err error) {
	p := op.plan
	s, j := int(h.GetStep()), int(h.GetChunk())
	bad := func(format string, a ...any) error {
		return &PeerError{Rank: r.pred, Via: r.rank, Op: op.id, Step: s, Chunk: j,
			Err: fmt.Errorf(format+": %w", append(a, ErrProtocol)...)}
	}
	switch {
	case h.GetTotalElems() != uint64(p.Length):
		return 0, 0, 0, bad("buffer of %d elements, this rank has %d", h.GetTotalElems(), p.Length)
	case h.GetDtype() != r.dtype:
		return 0, 0, 0, bad("wire dtype %v, this rank uses %v", h.GetDtype(), r.dtype)
	case s < op.first || s >= op.end:
		return 0, 0, 0, bad("step out of range [%d,%d) of this %v", op.first, op.end, op.part)
	case j >= p.Chunks:
		return 0, 0, 0, bad("chunk out of range [0,%d)", p.Chunks)
	}
	seg := p.RecvSegment(s)
	lo, hi = p.Chunk(seg, j)
	if int(h.GetElems()) != hi-lo {
		return 0, 0, 0, bad("chunk of %d elements, want %d", h.GetElems(), hi-lo)
	}
	idx = p.Index(s, j)
	if !op.got[idx].CompareAndSwap(false, true) {
		return 0, 0, 0, bad("duplicate chunk")
	}
	return idx, lo, hi, nil
}

// apply checks a data frame against the collective's plan and reduces or
// copies its payload into the buffer.
func (r *Ring) apply(op *opState, f *inFrame) error {
	defer f.release()
	h := f.hdr
	p := op.plan
	s := int(h.GetStep())
	idx, dst, err := r.admit(op, h)
	if err != nil {
		return err
	}
	if r.dtype == pb.DType_DTYPE_BF16 && f.slot != nil && r.shmOut != nil {
		// Slot in, slot out: the fused pass works in the slot itself, and
		// the shared-memory sender encodes the next step's payload from
		// dst, which gives the same bits (bf16 values widen and round
		// back exactly) without a staging copy.
		applyBF16Fused(dst, nil, f.slot, p.IsReduce(s), p.Finishes(s), op.kind, r.n)
	} else if r.dtype == pb.DType_DTYPE_BF16 {
		// One pass over dst that also writes the payload of the next
		// step's send of this chunk, instead of a separate conversion
		// pass over memory later.
		w := getWireBuf(len(dst) * 2)
		applyBF16Fused(dst, f.payload, w, p.IsReduce(s), p.Finishes(s), op.kind, r.n)
		if s+1 < op.end {
			op.prep[idx] = w
		} else {
			putWireBuf(w)
		}
	} else {
		applyPayload(dst, f.payload, r.dtype, p.IsReduce(s))
		if p.Finishes(s) {
			finish(dst, op.kind, r.n, false)
		}
	}
	r.stats.FramesRecv.Add(1)
	r.stats.BytesRecv.Add(uint64(int(h.GetElems()) * dtypeSize(r.dtype)))
	close(op.done[idx])
	return nil
}

type ringServer struct {
	pb.UnimplementedRingServer
	r *Ring
}

// Push serves one stream from the predecessor.
func (s *ringServer) Push(stream grpc.ClientStreamingServer[pb.Frame, pb.PushSummary]) error {
	r := s.r
	if err := r.checkPeerIdentity(stream.Context()); err != nil {
		// Not the predecessor's stream: nothing of it is read, and the
		// ring goes on (a stranger must not be able to fail it).
		r.log.Warn("refused stream", "error", err)
		r.mu.Lock()
		r.refused = err
		r.mu.Unlock()
		return toStatus(err)
	}
	hello := &inFrame{}
	if err := stream.RecvMsg(hello); err != nil {
		return toStatus(fmt.Errorf("allreduce: rank %d: reading hello: %w", r.rank, err))
	}
	h := hello.hdr
	hello.release()
	var herr error
	switch {
	case h.GetKind() != pb.Kind_KIND_HELLO:
		herr = fmt.Errorf("first frame is %v, want HELLO: %w", h.GetKind(), ErrProtocol)
	case h.GetEpoch() != r.cfg.Epoch:
		herr = fmt.Errorf("hello of epoch %d, ring is at epoch %d: %w", h.GetEpoch(), r.cfg.Epoch, ErrEpoch)
	case h.GetWorldSize() != uint32(r.n):
		herr = fmt.Errorf("hello for %d ranks, ring has %d: %w", h.GetWorldSize(), r.n, ErrProtocol)
	case int(h.GetSrcRank()) != r.pred:
		herr = fmt.Errorf("hello from rank %d, only the predecessor rank %d may connect: %w", h.GetSrcRank(), r.pred, ErrProtocol)
	case h.GetStreams() == 0 || h.GetStreams() > 65 || h.GetStream() >= h.GetStreams():
		herr = fmt.Errorf("hello for stream %d of %d: %w", h.GetStream(), h.GetStreams(), ErrProtocol)
	case h.GetElems() != 0 && int(h.GetElems()) != r.chunkElems:
		// Ranks that chunk differently plan different schedules: refuse at
		// once, rather than fail on the first frame of another size.
		herr = fmt.Errorf("hello with chunks of %d bytes, this rank's are %d: every rank of a ring needs the same ChunkBytes: %w",
			4*int64(h.GetElems()), 4*r.chunkElems, ErrConfig)
	}
	if herr != nil {
		err := &PeerError{Rank: int(h.GetSrcRank()), Via: r.rank, Step: -1, Chunk: -1, Err: herr}
		if h.GetEpoch() == r.cfg.Epoch && int(h.GetSrcRank()) == r.pred {
			r.fail(err) // our own predecessor is misconfigured: the ring cannot work
		} else {
			r.log.Warn("refused stream", "peer_rank", h.GetSrcRank(), "error", herr)
			r.mu.Lock()
			r.refused = err
			r.mu.Unlock()
		}
		return toStatus(err)
	}
	streamIdx := int(h.GetStream())
	md := metadata.MD{}
	useShm, useSock := false, false
	if h.GetShmPath() != "" {
		ipc := r.cfg.Transport == TransportCUDAIPC && ipcOffered(stream.Context())
		if why, ipcAns := r.acceptShm(h, ipc); why != "" {
			r.log.Debug("declined the predecessor's same-host path", "reason", why)
			md.Set(shmMetaKey, "declined: "+metaSafe(why))
		} else {
			md.Set(shmMetaKey, "ok")
			if ipc {
				md.Set(ipcMetaKey, ipcAns)
			}
			useShm = true
		}
	}
	if len(h.GetSockNonce()) > 0 && !useShm {
		if why := r.acceptSockOffer(h); why != "" {
			r.log.Debug("declined the predecessor's data sockets", "reason", why)
			md.Set(sockMetaKey, "declined: "+metaSafe(why))
		} else {
			md.Set(sockMetaKey, "ok")
			useSock = true
		}
	}
	if err := stream.SendHeader(md); err != nil {
		return toStatus(fmt.Errorf("allreduce: rank %d: accept stream %d from rank %d: %w", r.rank, streamIdx, r.pred, err))
	}
	r.mu.Lock()
	r.inCount++
	r.inWant = int(h.GetStreams())
	if useShm || useSock {
		r.inWant = 1 // this stream is the hop's only one (with its sockets)
	}
	r.inReadyLocked()
	r.mu.Unlock()
	for {
		f := &inFrame{}
		if err := stream.RecvMsg(f); err != nil {
			if errors.Is(err, io.EOF) {
				// The predecessor closed gracefully; everything it sent
				// has been delivered. If a collective still misses
				// frames, the hop deadline names the gap.
				return stream.SendAndClose(&pb.PushSummary{})
			}
			if r.isStopping() {
				return nil
			}
			perr := &PeerError{Rank: r.pred, Via: r.rank, Step: -1, Chunk: -1,
				Err: fmt.Errorf("stream %d broke: %v: %w", streamIdx, err, ErrPeerFailed)}
			if errors.Is(err, ErrFrame) || isDecodeErr(err) {
				perr.Err = fmt.Errorf("stream %d: %v: %w", streamIdx, err, ErrFrame)
			} else {
				// A predecessor that failed for its own reasons sends an
				// abort naming the culprit, then drops its data streams;
				// give that abort a moment to win.
				select {
				case <-r.failedCh:
				case <-time.After(min(r.graceAfterExpiry, 500*time.Millisecond)):
				case <-r.stopCh:
				}
			}
			r.fail(perr)
			return toStatus(perr)
		}
		if err := r.deliver(f, streamIdx); err != nil {
			r.fail(err)
			return toStatus(err)
		}
	}
}

// checkPeerIdentity applies Config.VerifyPeer to the certificate an
// incoming stream's connection presented: only the predecessor's slot may
// push to us.
func (r *Ring) checkPeerIdentity(ctx context.Context) error {
	if r.cfg.VerifyPeer == nil {
		return nil
	}
	var cert *x509.Certificate
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
			cert = ti.State.PeerCertificates[0]
		}
	}
	err := fmt.Errorf("no client certificate")
	if cert != nil {
		err = r.cfg.VerifyPeer(r.pred, cert)
	}
	if err != nil {
		return &PeerError{Rank: r.pred, Via: r.rank, Step: -1, Chunk: -1,
			Err: fmt.Errorf("a stream claiming predecessor rank %d's slot: %v: %w", r.pred, err, ErrIdentity)}
	}
	return nil
}

// acceptShm maps the shared-memory file a predecessor's hello offers and
// starts its consumers; it returns why not when it does not. With ipc (a
// cuda-ipc offer to a cuda-ipc rank) it first gives the region device slots
// and returns the answer to the offer (ipc.go).
func (r *Ring) acceptShm(h *pb.FrameHeader, ipc bool) (why, ipcAns string) {
	switch {
	case !r.shmCapable():
		return "transport " + r.cfg.Transport + " configured", ""
	case h.GetHost() == "" || h.GetHost() != r.host:
		return "another host", ""
	}
	reg, err := openShmRegion(h.GetShmPath(), h.GetShmNonce(), r.cfg.Epoch, r.pred, r.n)
	if err != nil {
		return err.Error(), ""
	}
	if ipc {
		ipcAns = r.ipcExport(reg)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || r.shmIn != nil || r.inDone {
		r.ipcRelease(reg)
		reg.unmap()
		return "ring closed or already connected", ""
	}
	r.shmIn = reg
	// Added under mu while not closed, so before Close waits on wg.
	r.wg.Add(len(reg.queues))
	for q := range reg.queues {
		go r.shmConsume(reg, q)
	}
	return "", ipcAns
}

// shmCapable reports whether this rank's Transport lets a hop use shared
// memory: "auto", or "cuda-ipc" (device slots on top).
func (r *Ring) shmCapable() bool {
	return r.cfg.Transport == TransportAuto || r.cfg.Transport == TransportCUDAIPC
}

// metaSafe keeps a header value to printable ASCII.
func metaSafe(s string) string {
	return strings.Map(func(c rune) rune {
		if c < ' ' || c > '~' {
			return '?'
		}
		return c
	}, s)
}

// finish completes the owned segment. This rank owns it: its value is final
// here and is copied verbatim to everyone else, so it is finished exactly
// once, on one rank.
func finish(dst []float32, kind Op, n int, bf16 bool) {
	if kind == Avg {
		d := float32(n)
		for i := range dst {
			dst[i] /= d
		}
	}
	if bf16 {
		roundBF16(dst) // the others receive it rounded; keep ours equal
	}
}

// splitAddr maps a peer address to a listen network: "unix:/path" is a Unix
// socket (ranks on one machine), anything else TCP "host:port". gRPC dials
// both forms as given.
func splitAddr(addr string) (network, address string) {
	if p, ok := strings.CutPrefix(addr, "unix:"); ok {
		return "unix", p
	}
	return "tcp", addr
}
