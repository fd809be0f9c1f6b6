package allreduce

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	pb "github.com/bmojo/bmojo/proto/allreducepb"
)

// TCPRing is the reference the gRPC data path is measured against: the same
// Plan, chunking, streams and reduce kernels, over plain TCP connections
// with a 16-byte header per chunk and nothing else. Payloads are written
// straight from the caller's buffer (one writev per chunk) and read straight
// into it (all-gather) or into one chunk-sized scratch buffer per stream
// that the AVX2 reduce reads (reduce-scatter): the kernel's two copies are
// the only copies.
//
// It exists for `bmojo bench allreduce --transport tcp` and its ratio: no
// TLS, no epochs, no aborts, no hop deadline beyond the context, no
// recovery. Training never uses it.
type TCPRing struct {
	n, rank, pred, succ int
	chunkElems, streams int
	addrs               []string
	lis                 net.Listener
	out, in             []net.Conn
	scratch             [][]byte
	maxElems            int
}

const (
	tcpRefMagic  = 0x42_4d_54_52 // "BMTR"
	tcpRefHeader = 16            // magic, step, chunk, elems: 4 × uint32 LE
)

// NewTCPRing creates rank cfg.Rank of a reference ring (cfg.Peers,
// ChunkBytes, Streams, MaxElems are used; the rest is ignored) and listens
// on lis, or on Peers[Rank] when lis is nil.
func NewTCPRing(cfg Config, lis net.Listener) (*TCPRing, error) {
	cfg.fillDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.WireBF16 {
		return nil, fmt.Errorf("allreduce: the TCP reference ring carries float32 only: %w", ErrConfig)
	}
	n := len(cfg.Peers)
	t := &TCPRing{n: n, rank: cfg.Rank, pred: mod(cfg.Rank-1, n), succ: mod(cfg.Rank+1, n),
		chunkElems: cfg.ChunkBytes / 4, streams: cfg.Streams, addrs: cfg.Peers, maxElems: cfg.MaxElems}
	if n > 1 && lis == nil {
		var err error
		network, address := splitAddr(cfg.Peers[cfg.Rank])
		if lis, err = net.Listen(network, address); err != nil {
			return nil, fmt.Errorf("allreduce: tcp reference rank %d listen on %s: %w", cfg.Rank, cfg.Peers[cfg.Rank], err)
		}
	}
	t.lis = lis
	return t, nil
}

// Connect dials Streams connections to the successor and accepts as many
// from the predecessor; each side names its stream index in an 8-byte
// hello (magic, index).
func (t *TCPRing) Connect(ctx context.Context) error {
	if t.n == 1 {
		return nil
	}
	t.in = make([]net.Conn, t.streams)
	accepted := make(chan error, 1)
	go func() { accepted <- t.accept(ctx) }()
	network, address := splitAddr(t.addrs[t.succ])
	var d net.Dialer
	for k := 0; k < t.streams; k++ {
		var c net.Conn
		var err error
		for {
			if c, err = d.DialContext(ctx, network, address); err == nil {
				break
			}
			select {
			case <-ctx.Done():
				_ = t.lis.Close() // ends accept
				<-accepted
				return fmt.Errorf("allreduce: tcp reference rank %d dial successor at %s: %w", t.rank, address, err)
			case <-time.After(20 * time.Millisecond):
			}
		}
		t.out = append(t.out, c)
		var hello [8]byte
		binary.LittleEndian.PutUint32(hello[0:], tcpRefMagic)
		binary.LittleEndian.PutUint32(hello[4:], uint32(k))
		if _, err := c.Write(hello[:]); err != nil {
			_ = t.lis.Close()
			<-accepted
			return fmt.Errorf("allreduce: tcp reference rank %d hello on stream %d: %w", t.rank, k, err)
		}
	}
	return <-accepted
}

func (t *TCPRing) accept(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() { _ = t.lis.Close() })
	defer stop()
	for got := 0; got < t.streams; {
		c, err := t.lis.Accept()
		if err != nil {
			return fmt.Errorf("allreduce: tcp reference rank %d accept: %w", t.rank, err)
		}
		var hello [8]byte
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadFull(c, hello[:])
		_ = c.SetReadDeadline(time.Time{})
		k := int(binary.LittleEndian.Uint32(hello[4:]))
		if err != nil || binary.LittleEndian.Uint32(hello[0:]) != tcpRefMagic || k >= t.streams || t.in[k] != nil {
			_ = c.Close()
			continue
		}
		t.in[k] = c
		got++
	}
	return nil
}

// AllReduce reduces buf in place across all ranks. ctx ending closes the
// connections (the ring is unusable afterwards).
func (t *TCPRing) AllReduce(ctx context.Context, buf []float32, op Op) error {
	if t.n == 1 {
		return nil
	}
	if len(buf) > t.maxElems {
		return fmt.Errorf("allreduce: tcp reference: buffer of %d elements above MaxElems %d: %w", len(buf), t.maxElems, ErrConfig)
	}
	p, err := NewPlan(t.n, t.rank, len(buf), t.chunkElems)
	if err != nil {
		return err
	}
	if t.scratch == nil {
		t.scratch = make([][]byte, t.streams)
		for k := range t.scratch {
			t.scratch[k] = make([]byte, 4*t.chunkElems)
		}
	}
	done := make([]chan struct{}, p.Steps()*p.Chunks)
	for i := range done {
		done[i] = make(chan struct{})
	}
	failed := make(chan struct{})
	var once sync.Once
	var first error
	fail := func(err error) {
		once.Do(func() {
			first = err
			close(failed)
			for _, c := range t.out {
				_ = c.Close()
			}
			for _, c := range t.in {
				_ = c.Close()
			}
		})
	}
	stop := context.AfterFunc(ctx, func() { fail(ctx.Err()) })
	defer stop()
	var wg sync.WaitGroup
	for k := 0; k < t.streams; k++ {
		wg.Add(2)
		go func(k int) {
			defer wg.Done()
			if err := t.sendLoop(p, buf, k, done, failed); err != nil {
				fail(err)
			}
		}(k)
		go func(k int) {
			defer wg.Done()
			if err := t.recvLoop(p, buf, op, k, done); err != nil {
				fail(err)
			}
		}(k)
	}
	wg.Wait()
	return first
}

func (t *TCPRing) sendLoop(p Plan, buf []float32, k int, done []chan struct{}, failed chan struct{}) error {
	c := t.out[k]
	var hdr [tcpRefHeader]byte
	for s := 0; s < p.Steps(); s++ {
		for j := k; j < p.Chunks; j += t.streams {
			if s > 0 {
				select {
				case <-done[p.Index(s-1, j)]:
				case <-failed:
					return nil
				}
			}
			lo, hi := p.Chunk(p.SendSegment(s), j)
			binary.LittleEndian.PutUint32(hdr[0:], tcpRefMagic)
			binary.LittleEndian.PutUint32(hdr[4:], uint32(s))
			binary.LittleEndian.PutUint32(hdr[8:], uint32(j))
			binary.LittleEndian.PutUint32(hdr[12:], uint32(hi-lo))
			bufs := net.Buffers{hdr[:], f32Bytes(buf[lo:hi])}
			if _, err := bufs.WriteTo(c); err != nil {
				return fmt.Errorf("allreduce: tcp reference rank %d send step %d chunk %d: %w", t.rank, s, j, err)
			}
		}
	}
	return nil
}

func (t *TCPRing) recvLoop(p Plan, buf []float32, op Op, k int, done []chan struct{}) error {
	c := t.in[k]
	var hdr [tcpRefHeader]byte
	for s := 0; s < p.Steps(); s++ {
		for j := k; j < p.Chunks; j += t.streams {
			lo, hi := p.Chunk(p.RecvSegment(s), j)
			if _, err := io.ReadFull(c, hdr[:]); err != nil {
				return fmt.Errorf("allreduce: tcp reference rank %d recv step %d chunk %d: %w", t.rank, s, j, err)
			}
			if binary.LittleEndian.Uint32(hdr[0:]) != tcpRefMagic || binary.LittleEndian.Uint32(hdr[4:]) != uint32(s) ||
				binary.LittleEndian.Uint32(hdr[8:]) != uint32(j) || binary.LittleEndian.Uint32(hdr[12:]) != uint32(hi-lo) {
				return fmt.Errorf("allreduce: tcp reference rank %d: header %x, want step %d chunk %d of %d elements: %w", t.rank, hdr, s, j, hi-lo, ErrProtocol)
			}
			dst := buf[lo:hi]
			if p.IsReduce(s) {
				in := t.scratch[k][:4*len(dst)]
				if _, err := io.ReadFull(c, in); err != nil {
					return fmt.Errorf("allreduce: tcp reference rank %d recv step %d chunk %d: %w", t.rank, s, j, err)
				}
				applyRun(dst, in, pb.DType_DTYPE_F32, true)
				if p.Finishes(s) {
					finish(dst, op, t.n, false)
				}
			} else if _, err := io.ReadFull(c, f32Bytes(dst)); err != nil {
				return fmt.Errorf("allreduce: tcp reference rank %d recv step %d chunk %d: %w", t.rank, s, j, err)
			}
			close(done[p.Index(s, j)])
		}
	}
	return nil
}

// Close closes the listener and every connection.
func (t *TCPRing) Close() error {
	var errs []error
	if t.lis != nil {
		if err := t.lis.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	for _, c := range append(t.out, t.in...) {
		if c != nil {
			_ = c.Close()
		}
	}
	return errors.Join(errs...)
}
