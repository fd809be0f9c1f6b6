package allreduce

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Config configures one rank's Ring. Every rank of a ring must use the same
// Peers, Epoch, ChunkBytes and WireBF16.
type Config struct {
	// Rank is this process's position in the ring, 0..len(Peers)-1.
	Rank int
	// Peers holds the "host:port" every rank listens on, indexed by rank,
	// or "unix:/path" for a Unix socket (ranks on one machine). Peers[Rank]
	// is only used when New is not given a listener.
	Peers []string
	// Epoch is the ring epoch, a fencing token raised whenever the ring is
	// re-formed; frames of any other epoch are refused.
	Epoch uint64
	// ChunkBytes is the pipelining chunk, in bytes of float32 buffer.
	// Default 256 KiB (see README.md for the measurements).
	ChunkBytes int
	// Streams is the number of TCP connections (one gRPC stream each, or
	// one data socket each with Transport "socket") to the successor
	// carrying data; a separate stream carries aborts. Each incoming stream
	// also applies its chunks on its own goroutine, so this is the
	// receive-side parallelism too. Default 8.
	Streams int
	// Transport picks the data path to the successor: "auto" (default)
	// moves chunk payloads through shared memory when the successor runs
	// on the same host and agrees (see shm.go), and over gRPC otherwise;
	// "grpc" always uses gRPC streams (and refuses a predecessor's
	// shared-memory offer); "socket" (for hops between hosts) moves them
	// over plain connections to the successor's listener, negotiated and
	// bound to the hop in the gRPC handshake, with TLS inside when the ring
	// has TLS (see sock.go), falling back to gRPC streams when the
	// successor is not configured "socket" too. gRPC carries the handshake
	// and aborts in every case. TLS does not apply to a shared-memory hop:
	// its data never leaves the host's memory. "cuda-ipc" is "auto" with
	// the shared-memory slots in device memory (ipc.go): chunks of device
	// collectives (StartDevice) move GPU to GPU between ranks on one host
	// configured "cuda-ipc" too, and through host shared memory (or gRPC)
	// wherever that cannot be set up. It needs Device.
	Transport string
	// Device is this rank's GPU memory (the kernels/cuda backend), for
	// device collectives (StartDevice, AllReduceDevice) and the cuda-ipc
	// hops. Default nil: collectives on host buffers only.
	Device DeviceMem
	// ShmQueues is the number of shared-memory slot rings to a same-host
	// successor; each has its own sender and receiver goroutine, so this
	// is the same-host path's parallelism (as Streams is gRPC's). At most
	// 31. Default 4.
	ShmQueues int
	// ShmSlots is the number of chunk-sized slots per ring, i.e. how many
	// chunks a rank may run ahead of its successor on that ring. Default 8.
	ShmSlots int
	// HopTimeout bounds how long a rank waits for the next chunk from its
	// predecessor before the collective fails naming it. Default 10 s.
	HopTimeout time.Duration
	// WireBF16 sends bfloat16 on the wire; accumulation stays float32.
	WireBF16 bool
	// WindowBytes is the HTTP/2 flow-control window of each stream and
	// connection (static, no BDP probing). Default 32 MiB.
	WindowBytes int32
	// ReadBufferBytes and WriteBufferBytes are gRPC's per-connection read
	// and write buffers; -1 turns that buffering off (the socket is read
	// straight into frame buffers; written one HTTP/2 frame per syscall).
	// Default: 64 KiB read buffer (a read system call per 4 HTTP/2 frames
	// instead of 2 per frame; 7% less CPU per collective on 2 cores, see
	// README.md), 1 MiB write buffer. Neither applies to data sockets.
	ReadBufferBytes, WriteBufferBytes int
	// MaxElems bounds a collective's length in elements: frames announcing
	// a longer buffer are refused, and so is a predecessor running ahead
	// with more than one such buffer of frames (see Ring's stash). Set it to
	// the largest buffer this process reduces. Default 1<<30 (4 GiB of
	// float32).
	MaxElems int
	// ServerTLS and ClientTLS enable (mutual) TLS when both are set: the
	// server side should set ClientAuth = tls.RequireAndVerifyClientCert.
	ServerTLS, ClientTLS *tls.Config
	// VerifyPeer, with TLS, binds ranks to identities: it is called with
	// the certificate the predecessor presents on each incoming stream and
	// the one the successor presents to our dial, and the rank that peer
	// must hold; an error refuses the connection before any frame of it is
	// read (aborts included). Without it, any certificate the CA signed may
	// take any slot.
	VerifyPeer func(rank int, cert *x509.Certificate) error
	// Logger is the parent logger; the ring logs under Named("allreduce").
	// Default: a null logger.
	Logger hclog.Logger

	// hostID replaces hostIdentity() when set: tests make ranks of one
	// process look like ranks on different hosts.
	hostID string
}

// Transport values.
const (
	// TransportAuto: shared memory to a same-host successor, gRPC otherwise.
	TransportAuto = "auto"
	// TransportGRPC: gRPC streams for every hop.
	TransportGRPC = "grpc"
	// TransportSocket: chunk payloads on plain connections (TCP, or Unix
	// for "unix:" peers) beside the gRPC control stream; never shared
	// memory. Ring.Transport reports it for such a hop.
	TransportSocket = "socket"
	// TransportShm is what Ring.Transport reports for a shared-memory hop.
	TransportShm = "shm"
	// TransportCUDAIPC: shared memory with the slots in device memory,
	// mapped by the successor through CUDA IPC (ipc.go); Ring.Transport
	// reports it for such a hop.
	TransportCUDAIPC = "cuda-ipc"
)

// Default returns a Config with every tunable at its default; callers fill in
// Rank, Peers and Epoch.
func Default() Config {
	return Config{
		ChunkBytes:       256 << 10,
		Streams:          8,
		Transport:        TransportAuto,
		ShmQueues:        4,
		ShmSlots:         8,
		HopTimeout:       10 * time.Second,
		WindowBytes:      32 << 20,
		ReadBufferBytes:  64 << 10,
		WriteBufferBytes: 1 << 20,
		MaxElems:         1 << 30,
	}
}

func (c *Config) fillDefaults() {
	d := Default()
	if c.ChunkBytes == 0 {
		c.ChunkBytes = d.ChunkBytes
	}
	if c.Streams == 0 {
		c.Streams = d.Streams
	}
	if c.Transport == "" {
		c.Transport = d.Transport
	}
	if c.ShmQueues == 0 {
		c.ShmQueues = d.ShmQueues
	}
	if c.ShmSlots == 0 {
		c.ShmSlots = d.ShmSlots
	}
	if c.HopTimeout == 0 {
		c.HopTimeout = d.HopTimeout
	}
	if c.WindowBytes == 0 {
		c.WindowBytes = d.WindowBytes
	}
	if c.ReadBufferBytes == 0 {
		c.ReadBufferBytes = d.ReadBufferBytes
	}
	if c.WriteBufferBytes == 0 {
		c.WriteBufferBytes = d.WriteBufferBytes
	}
	if c.MaxElems == 0 {
		c.MaxElems = d.MaxElems
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
}

func (c Config) readBuffer() int  { return max(c.ReadBufferBytes, 0) }
func (c Config) writeBuffer() int { return max(c.WriteBufferBytes, 0) }

// Validate reports the first invalid field, by name. It has no side effects.
func (c Config) Validate() error {
	switch {
	case len(c.Peers) == 0:
		return fmt.Errorf("allreduce: Peers is empty: %w", ErrConfig)
	case c.Rank < 0 || c.Rank >= len(c.Peers):
		return fmt.Errorf("allreduce: Rank %d out of range for %d peers: %w", c.Rank, len(c.Peers), ErrConfig)
	case c.ChunkBytes < 4 || c.ChunkBytes > 64<<20:
		return fmt.Errorf("allreduce: ChunkBytes %d outside [4, 64 MiB]: %w", c.ChunkBytes, ErrConfig)
	case c.Streams < 1 || c.Streams > 64:
		return fmt.Errorf("allreduce: Streams %d outside [1, 64]: %w", c.Streams, ErrConfig)
	case c.Transport != TransportAuto && c.Transport != TransportGRPC && c.Transport != TransportSocket && c.Transport != TransportCUDAIPC:
		return fmt.Errorf("allreduce: Transport %q is not %q, %q, %q or %q: %w", c.Transport, TransportAuto, TransportGRPC, TransportSocket, TransportCUDAIPC, ErrConfig)
	case c.Transport == TransportCUDAIPC && c.Device == nil:
		return fmt.Errorf("allreduce: Transport %q needs Device (the GPU memory its hops use): %w", TransportCUDAIPC, ErrConfig)
	case c.ShmQueues < 1 || c.ShmQueues > shmMaxQueues:
		return fmt.Errorf("allreduce: ShmQueues %d outside [1, %d]: %w", c.ShmQueues, shmMaxQueues, ErrConfig)
	case c.ShmSlots < 2 || c.ShmSlots > 1024:
		return fmt.Errorf("allreduce: ShmSlots %d outside [2, 1024]: %w", c.ShmSlots, ErrConfig)
	case c.HopTimeout <= 0:
		return fmt.Errorf("allreduce: HopTimeout %v must be positive: %w", c.HopTimeout, ErrConfig)
	case c.WindowBytes < 64<<10:
		return fmt.Errorf("allreduce: WindowBytes %d below 64 KiB: %w", c.WindowBytes, ErrConfig)
	case c.ReadBufferBytes < -1:
		return fmt.Errorf("allreduce: ReadBufferBytes %d below -1: %w", c.ReadBufferBytes, ErrConfig)
	case c.WriteBufferBytes < -1:
		return fmt.Errorf("allreduce: WriteBufferBytes %d below -1: %w", c.WriteBufferBytes, ErrConfig)
	case (c.ServerTLS == nil) != (c.ClientTLS == nil):
		return fmt.Errorf("allreduce: set both ServerTLS and ClientTLS, or neither: %w", ErrConfig)
	case c.VerifyPeer != nil && c.ServerTLS == nil:
		return fmt.Errorf("allreduce: VerifyPeer needs ServerTLS and ClientTLS (identities are certificates): %w", ErrConfig)
	}
	return nil
}
