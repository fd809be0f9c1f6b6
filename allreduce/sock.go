package allreduce

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
	"unsafe"

	pb "github.com/bmojo/bmojo/proto/allreducepb"
)

// The socket data path (Transport "socket"), for hops between hosts. grpc-go
// caps HTTP/2 DATA frames at 16 KiB and owns its buffers, so on the gRPC
// path every 16 KiB of payload is a frame read on its own (two system calls
// unbuffered, a copy out of the read buffer otherwise), a copy into gRPC's
// write buffer on the way out and, in the all-gather, a copy out of its
// receive buffers on the way in; with 2 cores for 4 ranks that cost 1.6–1.8×
// the CPU per byte of a ring over plain sockets (README.md, "Between
// hosts"). Here gRPC stays the control plane,
// as for the same-host path: it carries the HELLO that negotiates the
// sockets, the ABORTs, and notices a dead neighbour; chunk payloads go on
// plain connections, written with one writev per chunk straight from the
// gradient buffer (header + payload) and read straight into the gradient
// buffer (all-gather) or into a chunk-sized scratch buffer that the reduce
// reads while it is still in cache (reduce-scatter). The kernel's copies are
// the only copies.
//
// Negotiation. The sender offers the path in its first HELLO: a random
// 16-byte nonce (FrameHeader.sock_nonce) and the number of sockets
// (Streams). A receiver configured "socket" registers the offer and answers
// "bmojo-sock: ok" in its response headers; any other answer means gRPC
// streams, as before. On "ok" the sender dials Streams connections to the
// same address the gRPC connection uses. Each starts with an 8-byte
// plaintext preamble (sockPreamble), by which the receiver's listener tells
// it from a gRPC connection (HTTP/2's preface starts "PRI ", TLS's
// ClientHello 0x16); then, when the ring has TLS, a TLS handshake with the
// ring's certificates (the sender checks VerifyPeer on the successor's, the
// receiver on the predecessor's, before it reads one byte from inside the
// TLS session); then a 64-byte binding (sockBind*: epoch, ranks, the socket's
// index and count, the nonce), which the receiver checks against the offer
// and answers with an 8-byte acknowledgement. A connection that fails any of
// it is closed and the ring goes on: a stranger cannot fail it. Once every
// socket is bound the hop is connected; Connect waits for that.
//
// Data. Socket k carries the chunks j ≡ k (mod Streams) of every step of
// every collective, in plan order, each as the 64-byte header of a
// shared-memory slot (the fields of a DATA frame header and a per-socket
// sequence number) followed by the raw little-endian payload. The receiver
// reads only while a collective runs, and checks each header as frame
// decoding and delivery check a DATA frame (same *PeerErrors and
// sentinels), and also that it is exactly the next chunk the plan routes
// through that socket. A predecessor that runs ahead fills the socket's
// kernel buffers and then waits (no stash).
//
// Failures. fail sends the ABORT on the control stream first, then closes
// the successor hop's sockets and stops the reads of the predecessor hop's
// without closing them (closeSockets says why); Close closes everything. A
// reader or writer whose socket breaks gives an ABORT a moment to arrive (as
// a broken gRPC stream does) before it blames its neighbour. The hop
// deadline, blame and epochs are the gRPC path's.
const (
	sockPreamble     = "BMOJOSK1"
	sockBindMagic    = 0x4e49424b // "KBIN"
	sockAckMagic     = 0x4b43414b // "KACK"
	sockVersion      = 1
	sockBindBytes    = 64
	sockAckBytes     = 8
	sockNonceBytes   = 16
	sockMaxSockets   = 64
	sockHandshakeMax = 10 * time.Second
	// sockMetaKey is the response-header key in which the receiver
	// answers a socket offer: "ok", or why it declined.
	sockMetaKey = "bmojo-sock"

	sockBindVersion = 4
	sockBindEpoch   = 8
	sockBindSrc     = 16
	sockBindWorld   = 20
	sockBindIndex   = 24
	sockBindCount   = 28
	sockBindNonce   = 32
)

// sockInbound is the predecessor hop's sockets: registered when its offer
// is accepted, complete when every socket is bound.
type sockInbound struct {
	nonce []byte
	conns []net.Conn // to read from (TLS sessions with TLS)
	raw   []net.Conn // the connections under them, closed to stop the readers
	bound int
	seq   []uint64         // next sequence number per socket (its reader's alone)
	race  []unsafe.Pointer // -race builds only (sock_race.go)
}

func (in *sockInbound) complete() bool { return in != nil && in.bound == len(in.conns) }

// newSockNonce is a socket offer's nonce.
func newSockNonce() ([]byte, error) {
	b := make([]byte, sockNonceBytes)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("allreduce: socket nonce: %w", err)
	}
	return b, nil
}

// acceptSockOffer registers the socket offer of a predecessor's first
// HELLO; it returns why not when it declines.
func (r *Ring) acceptSockOffer(h *pb.FrameHeader) string {
	k := int(h.GetSockets())
	switch {
	case r.cfg.Transport != TransportSocket:
		return "transport " + r.cfg.Transport + " configured"
	case len(h.GetSockNonce()) != sockNonceBytes:
		return fmt.Sprintf("nonce of %d bytes, want %d", len(h.GetSockNonce()), sockNonceBytes)
	case k < 1 || k > sockMaxSockets:
		return fmt.Sprintf("%d sockets, want 1..%d", k, sockMaxSockets)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || r.sockIn != nil || r.inDone {
		return "ring closed or already connected"
	}
	r.sockIn = &sockInbound{
		nonce: append([]byte(nil), h.GetSockNonce()...),
		conns: make([]net.Conn, k),
		raw:   make([]net.Conn, k),
		seq:   make([]uint64, k),
		race:  make([]unsafe.Pointer, k),
	}
	for i := range r.sockIn.race {
		r.sockIn.race[i] = sockRaceToken(h.GetSockNonce(), i)
	}
	return ""
}

// inReadyLocked closes inReady once the predecessor's hop is complete: all
// its streams, and its sockets on a socket hop. r.mu is held.
func (r *Ring) inReadyLocked() {
	if r.inDone || r.inCount < r.inWant || (r.sockIn != nil && !r.sockIn.complete()) {
		return
	}
	r.inDone = true
	close(r.inReady)
}

// sockListener is the listener gRPC serves on when the ring accepts data
// sockets: it hands gRPC every connection except data sockets, which it
// binds to the predecessor's hop itself.
type sockListener struct {
	net.Listener
	r       *Ring
	grpc    chan net.Conn
	done    chan struct{}
	once    sync.Once
	mu      sync.Mutex
	pending map[net.Conn]struct{} // connections still in their handshake
}

func newSockListener(r *Ring, lis net.Listener) *sockListener {
	return &sockListener{Listener: lis, r: r, grpc: make(chan net.Conn), done: make(chan struct{}), pending: map[net.Conn]struct{}{}}
}

// Accept returns the next connection that is not a data socket.
func (l *sockListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.grpc:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close closes the listener and every connection still in its handshake.
func (l *sockListener) Close() error {
	l.once.Do(func() { close(l.done) })
	err := l.Listener.Close()
	l.mu.Lock()
	for c := range l.pending {
		_ = c.Close()
	}
	l.pending = nil
	l.mu.Unlock()
	return err
}

// run accepts connections until the listener is closed; each is sorted out
// on its own goroutine. r.wg counts run and those goroutines.
func (l *sockListener) run() {
	defer l.r.wg.Done()
	defer l.Close()
	var backoff time.Duration
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// Transient (out of descriptors and the like), as
				// grpc.Server treats it: back off and go on.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				select {
				case <-time.After(backoff):
					continue
				case <-l.done:
				}
			}
			return
		}
		backoff = 0
		l.mu.Lock()
		if l.pending == nil { // closed
			l.mu.Unlock()
			_ = c.Close()
			return
		}
		l.pending[c] = struct{}{}
		l.r.wg.Add(1) // run still holds its own count here
		l.mu.Unlock()
		go l.sort(c)
	}
}

// sort reads the preamble: a data socket is bound to the predecessor's hop,
// anything else goes to gRPC with the bytes read put back in front.
func (l *sockListener) sort(c net.Conn) {
	defer l.r.wg.Done()
	keep := false
	defer func() {
		l.mu.Lock()
		if l.pending != nil {
			delete(l.pending, c)
		}
		l.mu.Unlock()
		if !keep {
			_ = c.Close()
		}
	}()
	_ = c.SetDeadline(time.Now().Add(sockHandshakeMax))
	var pre [len(sockPreamble)]byte
	// gRPC's first bytes (HTTP/2's 24-byte preface, or a TLS ClientHello)
	// always number more than the preamble's 8.
	if _, err := io.ReadFull(c, pre[:]); err != nil {
		return
	}
	if string(pre[:]) != sockPreamble {
		_ = c.SetDeadline(time.Time{})
		select {
		case l.grpc <- &prefixConn{Conn: c, pre: pre[:]}:
			keep = true
		case <-l.done:
		}
		return
	}
	if err := l.r.bindSocket(c); err != nil {
		l.r.log.Warn("refused data socket", "remote", c.RemoteAddr().String(), "error", err)
		l.r.mu.Lock()
		l.r.refused = err
		l.r.mu.Unlock()
		return
	}
	keep = true
}

// prefixConn is a connection whose first bytes were read already.
type prefixConn struct {
	net.Conn
	pre []byte
}

func (c *prefixConn) Read(b []byte) (int, error) {
	if len(c.pre) > 0 {
		n := copy(b, c.pre)
		c.pre = c.pre[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// bindSocket runs the receiving side of a data socket's handshake on c
// (preamble read; deadline set): TLS and the predecessor's identity when
// the ring has TLS, then the binding, checked against the registered offer.
// Once it returns nil the socket belongs to the hop (Close closes it).
func (r *Ring) bindSocket(c net.Conn) error {
	refuse := func(sentinel error, format string, a ...any) error {
		return &PeerError{Rank: r.pred, Via: r.rank, Step: -1, Chunk: -1,
			Err: fmt.Errorf("a data socket claiming predecessor rank %d's hop: %s: %w", r.pred, fmt.Sprintf(format, a...), sentinel)}
	}
	conn := c
	if r.cfg.ServerTLS != nil {
		tc := r.cfg.ServerTLS.Clone()
		tc.NextProtos = nil // not HTTP/2
		t := tls.Server(c, tc)
		if err := t.Handshake(); err != nil {
			return refuse(ErrIdentity, "tls handshake: %v", err)
		}
		if verify := r.cfg.VerifyPeer; verify != nil {
			st := t.ConnectionState()
			if len(st.PeerCertificates) == 0 {
				return refuse(ErrIdentity, "no client certificate")
			}
			if err := verify(r.pred, st.PeerCertificates[0]); err != nil {
				return refuse(ErrIdentity, "%v", err)
			}
		}
		conn = t
	}
	var b [sockBindBytes]byte
	if _, err := io.ReadFull(conn, b[:]); err != nil {
		return refuse(ErrProtocol, "reading its binding: %v", err)
	}
	le := binary.LittleEndian
	if m, v := le.Uint32(b[0:]), le.Uint32(b[sockBindVersion:]); m != sockBindMagic || v != sockVersion {
		return refuse(ErrProtocol, "binding magic %#x version %d, want %#x version %d (run the same bmojo version on every rank)", m, v, sockBindMagic, sockVersion)
	}
	epoch, src, world := le.Uint64(b[sockBindEpoch:]), int(le.Uint32(b[sockBindSrc:])), int(le.Uint32(b[sockBindWorld:]))
	idx, count := int(le.Uint32(b[sockBindIndex:])), int(le.Uint32(b[sockBindCount:]))
	if epoch != r.cfg.Epoch {
		return refuse(ErrEpoch, "binding of epoch %d, ring is at epoch %d", epoch, r.cfg.Epoch)
	}
	if src != r.pred || world != r.n {
		return refuse(ErrProtocol, "binding from rank %d of %d, want rank %d of %d", src, world, r.pred, r.n)
	}
	r.mu.Lock()
	in := r.sockIn
	switch {
	case r.closed:
		r.mu.Unlock()
		return refuse(ErrClosed, "ring closed")
	case in == nil:
		r.mu.Unlock()
		return refuse(ErrProtocol, "no socket offer from the predecessor")
	case subtle.ConstantTimeCompare(in.nonce, b[sockBindNonce:sockBindNonce+sockNonceBytes]) != 1:
		r.mu.Unlock()
		return refuse(ErrProtocol, "nonce differs from the offer's")
	case count != len(in.conns) || idx < 0 || idx >= count || in.conns[idx] != nil:
		r.mu.Unlock()
		return refuse(ErrProtocol, "socket %d of %d (offer: %d sockets)", idx, count, len(in.conns))
	}
	_ = c.SetDeadline(time.Time{})
	in.conns[idx], in.raw[idx] = conn, c
	in.bound++
	if in.complete() {
		// Added under mu while not closed, so before Close waits on wg.
		r.wg.Add(len(in.conns))
		for k := range in.conns {
			go r.sockConsume(in, k)
		}
		r.inReadyLocked()
	}
	r.mu.Unlock()
	var ack [sockAckBytes]byte
	le.PutUint32(ack[0:], sockAckMagic)
	le.PutUint32(ack[4:], uint32(idx))
	// An 8-byte write into a fresh connection does not block. If it
	// fails, the sender's Connect fails, and our reader on its first read.
	_, _ = conn.Write(ack[:])
	return nil
}

// successorTLS is the client TLS configuration for connections to the
// successor: with VerifyPeer, the successor must hold the successor's slot
// too (our gradients go to no one else).
func (r *Ring) successorTLS() *tls.Config {
	tc := r.cfg.ClientTLS
	verify := r.cfg.VerifyPeer
	if tc == nil || verify == nil {
		return tc
	}
	tc = tc.Clone()
	base, succ := tc.VerifyConnection, r.succ
	tc.VerifyConnection = func(cs tls.ConnectionState) error {
		if base != nil {
			if err := base(cs); err != nil {
				return err
			}
		}
		if len(cs.PeerCertificates) == 0 {
			return fmt.Errorf("allreduce: successor rank %d presented no certificate: %w", succ, ErrIdentity)
		}
		if err := verify(succ, cs.PeerCertificates[0]); err != nil {
			return fmt.Errorf("allreduce: successor rank %d: %v: %w", succ, err, ErrIdentity)
		}
		return nil
	}
	return tc
}

// dialSockets opens the k data sockets of an accepted offer to the
// successor at addr.
func (r *Ring) dialSockets(ctx context.Context, addr string, nonce []byte, k int) ([]net.Conn, error) {
	conns := make([]net.Conn, k)
	for i := range conns {
		c, err := r.dialSocket(ctx, addr, nonce, i, k)
		if err != nil {
			return nil, err
		}
		conns[i] = c
	}
	return conns, nil
}

func (r *Ring) dialSocket(ctx context.Context, addr string, nonce []byte, i, k int) (net.Conn, error) {
	fail := func(err error) error {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		var pe *PeerError
		if errors.As(err, &pe) {
			return err
		}
		return &PeerError{Rank: r.succ, Via: r.rank, Step: -1, Chunk: -1,
			Err: fmt.Errorf("data socket %d to successor at %s: %w", i, addr, err)}
	}
	network, address := splitAddr(addr)
	var d net.Dialer
	raw, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, fail(err)
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		_ = raw.Close()
		return nil, fail(ErrClosed)
	}
	r.sockAll = append(r.sockAll, raw) // closed by fail and Close, whatever happens next
	r.mu.Unlock()
	// Bound by ctx, and by the receiver's own handshake deadline.
	_ = raw.SetDeadline(time.Now().Add(sockHandshakeMax))
	stop := context.AfterFunc(ctx, func() { _ = raw.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := raw.Write([]byte(sockPreamble)); err != nil {
		return nil, fail(err)
	}
	conn := raw
	if tc := r.successorTLS(); tc != nil {
		tc = tc.Clone()
		tc.NextProtos = nil // not HTTP/2
		if tc.ServerName == "" {
			// What gRPC's TLS credentials verify for the same address.
			tc.ServerName = "localhost"
			if network != "unix" {
				if host, _, err := net.SplitHostPort(address); err == nil {
					tc.ServerName = host
				} else {
					tc.ServerName = address
				}
			}
		}
		t := tls.Client(raw, tc)
		if err := t.HandshakeContext(ctx); err != nil {
			if errors.Is(err, ErrIdentity) {
				return nil, &PeerError{Rank: r.succ, Via: r.rank, Step: -1, Chunk: -1,
					Err: fmt.Errorf("data socket %d to successor at %s: %w", i, addr, err)}
			}
			return nil, fail(fmt.Errorf("tls handshake: %w", err))
		}
		conn = t
	}
	var b [sockBindBytes]byte
	le := binary.LittleEndian
	le.PutUint32(b[0:], sockBindMagic)
	le.PutUint32(b[sockBindVersion:], sockVersion)
	le.PutUint64(b[sockBindEpoch:], r.cfg.Epoch)
	le.PutUint32(b[sockBindSrc:], uint32(r.rank))
	le.PutUint32(b[sockBindWorld:], uint32(r.n))
	le.PutUint32(b[sockBindIndex:], uint32(i))
	le.PutUint32(b[sockBindCount:], uint32(k))
	copy(b[sockBindNonce:], nonce)
	if _, err := conn.Write(b[:]); err != nil {
		return nil, fail(err)
	}
	var ack [sockAckBytes]byte
	if _, err := io.ReadFull(conn, ack[:]); err != nil {
		return nil, fail(fmt.Errorf("the successor refused it (%v)", err))
	}
	if le.Uint32(ack[0:]) != sockAckMagic || le.Uint32(ack[4:]) != uint32(i) {
		return nil, fail(fmt.Errorf("acknowledgement %x: %w", ack, ErrProtocol))
	}
	_ = raw.SetDeadline(time.Time{})
	if !stop() {
		// ctx ended just now and set the past deadline: give up.
		return nil, fail(ctx.Err())
	}
	return conn, nil
}

// closeSockets unblocks every data socket's reader and writer. It closes
// the successor hop's sockets (ours still in their handshake too), as fail
// cancels gRPC data streams: the successor then gives our ABORT a moment to
// arrive. The predecessor hop's sockets it only closes when the ring is
// closing (all); otherwise it stops their reads with a past deadline and
// leaves them open, as a failed rank leaves its incoming gRPC streams: a
// predecessor that is still healthy must learn of the failure from the
// ABORT that travels around the ring, which names the culprit, not from a
// connection broken under its writes (it would blame us). Connections under
// TLS sessions are closed directly: a TLS close would first try to write a
// close_notify to a peer that may have stopped reading.
func (r *Ring) closeSockets(all bool) {
	r.mu.Lock()
	out := append([]net.Conn(nil), r.sockAll...)
	var in []net.Conn
	if r.sockIn != nil {
		for _, c := range r.sockIn.raw {
			if c != nil {
				in = append(in, c)
			}
		}
	}
	r.mu.Unlock()
	for _, c := range out {
		_ = c.Close()
	}
	for _, c := range in {
		if all {
			_ = c.Close()
		} else {
			_ = c.SetReadDeadline(time.Unix(1, 0))
		}
	}
}

// sockSendLoop is sendLoop over data sockets: chunks j ≡ k (mod sockets) of
// every step, one writev of header and payload each, straight from the
// buffer (float32) or from the bf16 payload apply made.
func (r *Ring) sockSendLoop(op *opState, k int) error {
	c := r.sockOut[k]
	ns := len(r.sockOut)
	p := op.plan
	var hdr [slotHdrBytes]byte
	return r.sends(op, k, ns, func(s, j, lo, hi int) error {
		src := op.buf[lo:hi]
		var payload, pooled []byte
		if r.dtype == pb.DType_DTYPE_BF16 {
			if idx := p.Index(s-1, j); s > op.first && op.prep[idx] != nil {
				pooled = op.prep[idx] // made by apply while the values were in registers
				op.prep[idx] = nil
			} else {
				// The bits apply would have made (the chunk came
				// through shared memory, or this is the first step).
				pooled = getWireBuf(2 * len(src))
				toBF16(pooled, src)
			}
			payload = pooled
		} else {
			payload = f32Bytes(src)
		}
		putSlotHeader(hdr[:], r.sockSeq[k], &pb.FrameHeader{
			Kind: pb.Kind_KIND_DATA, Epoch: r.cfg.Epoch, SrcRank: uint32(r.rank),
			Op: op.id, Step: uint32(s), Chunk: uint32(j), TotalElems: uint64(p.Length),
			Dtype: r.dtype, Elems: uint32(len(src)),
		})
		r.sockSeq[k]++
		bufs := net.Buffers{hdr[:], payload}
		sockRaceRelease(r.sockRace[k])
		_, err := bufs.WriteTo(c)
		if pooled != nil {
			putWireBuf(pooled)
		}
		if err != nil {
			// A successor that failed closes its sockets after
			// sending its ABORT around the ring, which names the
			// culprit: give it a moment to win.
			return r.afterGrace(&PeerError{Rank: r.succ, Via: r.rank, Op: op.id, Step: s, Chunk: j,
				Err: fmt.Errorf("send on data socket %d: %v: %w", k, err, ErrPeerFailed)})
		}
		r.stats.FramesSent.Add(1)
		r.stats.BytesSent.Add(uint64(len(payload)))
		return nil
	})
}

// sockConsume is data socket k's reader: for every collective this rank
// starts, it reads and applies exactly the chunks the plan routes through
// socket k, in order. It reads nothing while no collective runs.
func (r *Ring) sockConsume(in *sockInbound, k int) {
	var scratch []byte
	r.consume(func(op *opState) error {
		if scratch == nil && r.dtype == pb.DType_DTYPE_F32 {
			scratch = make([]byte, 4*r.chunkElems)
		}
		return r.sockRecvOp(in, k, op, scratch)
	})
}

func (r *Ring) sockRecvOp(in *sockInbound, k int, op *opState, scratch []byte) error {
	c := in.conns[k]
	ns := len(in.conns)
	p := op.plan
	var hb [slotHdrBytes]byte
	where := fmt.Sprintf("data socket %d", k)
	for s := op.first; s < op.end; s++ {
		for j := k; j < p.Chunks; j += ns {
			if _, err := io.ReadFull(c, hb[:]); err != nil {
				return r.sockBroke(op, k, s, j, err)
			}
			sockRaceAcquire(in.race[k])
			h, seq, magic := parseSlotHeader(hb[:])
			bad := func(sentinel error, format string, a ...any) error {
				return &PeerError{Rank: r.pred, Via: r.rank, Op: op.id, Step: s, Chunk: j,
					Err: fmt.Errorf("%s: %s: %w", where, fmt.Sprintf(format, a...), sentinel)}
			}
			if magic != slotMagic {
				return bad(ErrFrame, "header magic %#x, want %#x", magic, slotMagic)
			}
			if seq != in.seq[k] {
				return bad(ErrFrame, "header of sequence number %d, want %d", seq, in.seq[k])
			}
			in.seq[k]++
			if h.Kind != pb.Kind_KIND_DATA {
				return bad(ErrFrame, "kind %v", h.Kind)
			}
			if dtypeSize(h.Dtype) == 0 {
				return bad(ErrFrame, "dtype %v", h.Dtype)
			}
			if err := r.checkSender(h, where); err != nil {
				return err
			}
			if h.Op != op.id {
				return &PeerError{Rank: r.pred, Via: r.rank, Op: h.Op, Step: int(h.Step), Chunk: int(h.Chunk),
					Err: fmt.Errorf("frame for op %d while at op %d on %s: %w", h.Op, op.id, where, ErrProtocol)}
			}
			idx, dst, err := r.admit(op, h)
			if err != nil {
				return err
			}
			if int(h.Step) != s || int(h.Chunk) != j {
				return &PeerError{Rank: r.pred, Via: r.rank, Op: op.id, Step: int(h.Step), Chunk: int(h.Chunk),
					Err: fmt.Errorf("step %d chunk %d on %s, want step %d chunk %d next: %w", h.Step, h.Chunk, where, s, j, ErrProtocol)}
			}
			n := len(dst) * dtypeSize(r.dtype)
			switch {
			case r.dtype == pb.DType_DTYPE_BF16:
				w := getWireBuf(n)
				if _, err := io.ReadFull(c, w); err != nil {
					putWireBuf(w)
					return r.sockBroke(op, k, s, j, err)
				}
				// In place: w becomes what we send next for this chunk.
				applyBF16Fused(dst, nil, w, p.IsReduce(s), p.Finishes(s), op.kind, r.n)
				if s+1 < op.end {
					op.prep[idx] = w
				} else {
					putWireBuf(w)
				}
			case p.IsReduce(s):
				got := scratch[:n]
				if _, err := io.ReadFull(c, got); err != nil {
					return r.sockBroke(op, k, s, j, err)
				}
				applyRun(dst, got, pb.DType_DTYPE_F32, true)
				if p.Finishes(s) {
					finish(dst, op.kind, r.n, false)
				}
			default:
				if _, err := io.ReadFull(c, f32Bytes(dst)); err != nil {
					return r.sockBroke(op, k, s, j, err)
				}
			}
			r.stats.FramesRecv.Add(1)
			r.stats.BytesRecv.Add(uint64(n))
			close(op.done[idx])
		}
	}
	return nil
}

// sockBroke is the error for a data socket that failed under a read: none
// when the ring is failing or stopping (that closed it), else the
// predecessor's, once an ABORT naming the culprit has had a moment to win
// (a predecessor that failed for its own reasons sends one, then closes its
// sockets).
func (r *Ring) sockBroke(op *opState, k, s, j int, err error) error {
	return r.afterGrace(&PeerError{Rank: r.pred, Via: r.rank, Op: op.id, Step: s, Chunk: j,
		Err: fmt.Errorf("data socket %d broke: %v: %w", k, err, ErrPeerFailed)})
}

// afterGrace returns err unless the ring fails or stops within a short
// grace (then nil: the failure that closed the socket is the ring's error).
func (r *Ring) afterGrace(err error) error {
	select {
	case <-r.failedCh:
		return nil
	case <-r.stopCh:
		return nil
	case <-time.After(min(r.graceAfterExpiry, 500*time.Millisecond)):
	}
	return err
}
