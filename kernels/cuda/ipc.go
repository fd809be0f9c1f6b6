//go:build cuda

package cuda

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/bmojo/bmojo/kernels"
)

// CUDA IPC: device memory that another process on the same host maps, so
// that the all-reduce ring's same-host hops move gradients GPU to GPU
// (allreduce's cuda-ipc transport; *Backend implements allreduce.DeviceMem).
//
// An IPC allocation is not from the caching allocator (alloc.go): the
// driver exports only whole cuMemAlloc blocks, and a block that another
// process has mapped must never be handed to a new buffer. AllocIPC takes
// one from the driver, ExportIPC makes the handle a peer passes to
// OpenIPC, and CloseIPC frees it (or unmaps a peer's); the garbage
// collector never does. On a GPU the handle wraps cuIpcGetMemHandle's
// (ipc_cuda.go); in the emulation device memory is host memory, so an IPC
// allocation is a MAP_SHARED file in /dev/shm and the handle names it
// (ipc_emu.go), which makes a real two-process test possible on the CPU.
//
// As CUDA does, a process cannot open its own handle: same-process peers
// (every rank of a test in one process) fall back to host copies.
//
// Handle layout (little-endian): "BMOJOIPC", version u32, kind u32 (1 a
// GPU's, 2 the emulation's), the allocation's bytes u64, the exporter's pid
// u32, 4 reserved bytes, then the kind's payload.
const (
	ipcMagic   = "BMOJOIPC"
	ipcVersion = 1
	ipcHdr     = 32

	ipcKindGPU = 1
	ipcKindEmu = 2
)

// ErrIPC marks a handle this process cannot open (malformed, another
// build's, its own, too small for what was asked, or refused by the
// driver); callers fall back to host copies.
var ErrIPC = errors.New("cuda ipc")

// ipcBuf is one IPC mapping of this process: an allocation it exported or
// a peer's it opened.
type ipcBuf struct {
	f     *floats
	own   bool
	bytes int64
	priv  ipcPriv // the driver side's state (ipc_cuda.go, ipc_emu.go)
}

// ipcTable is a Device's IPC mappings by address.
type ipcTable struct {
	mu   sync.Mutex
	bufs map[devptr]*ipcBuf
}

var ipcTables sync.Map // *Device → *ipcTable

func (d *Device) ipc() *ipcTable {
	t, _ := ipcTables.LoadOrStore(d, &ipcTable{bufs: map[devptr]*ipcBuf{}})
	return t.(*ipcTable)
}

// lookup returns the mapping buf is (the whole of it, not a view).
func (t *ipcTable) lookup(buf kernels.Buffer) (*ipcBuf, error) {
	f, ok := buf.(*floats)
	if !ok || f == nil {
		return nil, fmt.Errorf("kernels/cuda: %T is not a buffer of this backend: %w", buf, ErrIPC)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	m := t.bufs[f.ptr]
	if m == nil || m.f.owner != f.owner || m.f.n != f.n {
		return nil, fmt.Errorf("kernels/cuda: the buffer is not an IPC allocation or mapping of this device, or a view of one (AllocIPC, OpenIPC): %w", ErrIPC)
	}
	return m, nil
}

// newIPCFloats is the buffer of a mapping: an allocation record of its own
// (so the shadow and lazy-zero tables can key on it) that the caching
// allocator never sees. Device thread.
func (d *Device) newIPCFloats(p devptr, bytes int64, n int) *floats {
	d.mem.nextID++
	return &floats{ptr: p, n: n, owner: &allocation{ptr: p, size: bytes, id: d.mem.nextID}}
}

// AllocIPC returns n float32 of device memory that ExportIPC can hand to
// another process. Its contents are undefined until written. Free it with
// CloseIPC.
func (b *Backend) AllocIPC(n int) (kernels.Buffer, error) {
	if n <= 0 {
		return nil, fmt.Errorf("kernels/cuda: AllocIPC of %d floats: want at least 1", n)
	}
	bytes := int64(n) * 4
	var f *floats
	var priv ipcPriv
	var err error
	b.d.do(func() {
		var p devptr
		if p, priv, err = ipcAllocate(bytes); err == nil {
			f = b.d.newIPCFloats(p, bytes, n)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("kernels/cuda: AllocIPC of %s: %w", mib(bytes), err)
	}
	t := b.d.ipc()
	t.mu.Lock()
	t.bufs[f.ptr] = &ipcBuf{f: f, own: true, bytes: bytes, priv: priv}
	t.mu.Unlock()
	return f, nil
}

// ExportIPC returns the handle of an AllocIPC allocation: bytes another
// process of this host passes to OpenIPC.
func (b *Backend) ExportIPC(buf kernels.Buffer) ([]byte, error) {
	m, err := b.d.ipc().lookup(buf)
	if err != nil {
		return nil, err
	}
	if !m.own {
		return nil, fmt.Errorf("kernels/cuda: ExportIPC of a peer's mapping: only AllocIPC allocations are exported: %w", ErrIPC)
	}
	var payload []byte
	b.d.do(func() { payload, err = ipcExport(m.f.ptr, m.priv) })
	if err != nil {
		return nil, fmt.Errorf("kernels/cuda: ExportIPC: %w", err)
	}
	h := make([]byte, ipcHdr, ipcHdr+len(payload))
	copy(h, ipcMagic)
	le := binary.LittleEndian
	le.PutUint32(h[8:], ipcVersion)
	le.PutUint32(h[12:], ipcKind)
	le.PutUint64(h[16:], uint64(m.bytes))
	le.PutUint32(h[24:], uint32(os.Getpid()))
	return append(h, payload...), nil
}

// parseIPCHandle checks a handle's header and returns its payload; n is
// the floats the caller wants to reach through it.
func parseIPCHandle(h []byte, n int) (bytes int64, payload []byte, err error) {
	le := binary.LittleEndian
	switch {
	case n <= 0:
		return 0, nil, fmt.Errorf("OpenIPC of %d floats: want at least 1", n)
	case len(h) < ipcHdr:
		return 0, nil, fmt.Errorf("a handle of %d bytes is shorter than the %d-byte header", len(h), ipcHdr)
	case string(h[:8]) != ipcMagic:
		return 0, nil, fmt.Errorf("not a bmojo IPC handle (magic %q)", h[:8])
	case le.Uint32(h[8:]) != ipcVersion:
		return 0, nil, fmt.Errorf("handle version %d, this build reads %d: run one bmojo version on every rank", le.Uint32(h[8:]), ipcVersion)
	case le.Uint32(h[12:]) != ipcKind:
		kinds := map[uint32]string{ipcKindGPU: "a GPU build", ipcKindEmu: "the CPU emulation (cudaemu)"}
		return 0, nil, fmt.Errorf("handle made by %s, this process is %s", kinds[le.Uint32(h[12:])], kinds[ipcKind])
	}
	bytes = int64(le.Uint64(h[16:]))
	if int64(n)*4 > bytes {
		return 0, nil, fmt.Errorf("the exported allocation holds %d bytes, %d floats (%d bytes) asked", bytes, n, int64(n)*4)
	}
	if int(le.Uint32(h[24:])) == os.Getpid() {
		return 0, nil, fmt.Errorf("the handle was exported by this process, and CUDA opens IPC handles only in other processes")
	}
	return bytes, h[ipcHdr:], nil
}

// OpenIPC maps the first n floats of the allocation another process
// exported (ExportIPC) into this one; unmap it with CloseIPC. Errors wrap
// ErrIPC: the caller can always fall back to host memory.
func (b *Backend) OpenIPC(handle []byte, n int) (kernels.Buffer, error) {
	bytes, payload, err := parseIPCHandle(handle, n)
	if err != nil {
		return nil, fmt.Errorf("kernels/cuda: OpenIPC: %v: %w", err, ErrIPC)
	}
	var f *floats
	var priv ipcPriv
	b.d.do(func() {
		var p devptr
		if p, priv, err = ipcOpen(payload, bytes); err == nil {
			f = b.d.newIPCFloats(p, bytes, n)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("kernels/cuda: OpenIPC: %v: %w", err, ErrIPC)
	}
	t := b.d.ipc()
	t.mu.Lock()
	if t.bufs[f.ptr] != nil {
		// The driver maps a handle once per context and returns the
		// same address again; one mapping per handle keeps CloseIPC
		// simple.
		t.mu.Unlock()
		return nil, fmt.Errorf("kernels/cuda: OpenIPC: the allocation is mapped already: %w", ErrIPC)
	}
	t.bufs[f.ptr] = &ipcBuf{f: f, bytes: bytes, priv: priv}
	t.mu.Unlock()
	return f, nil
}

// CloseIPC waits for the work queued on the device, then frees an AllocIPC
// allocation (a peer that still has it mapped must be done with it) or
// unmaps a peer's (OpenIPC). Neither buf nor its views may be used after.
func (b *Backend) CloseIPC(buf kernels.Buffer) error {
	t := b.d.ipc()
	m, err := t.lookup(buf)
	if err != nil {
		return err
	}
	t.mu.Lock()
	delete(t.bufs, m.f.ptr)
	t.mu.Unlock()
	b.d.do(func() {
		err = b.d.drv.sync()
		if rerr := ipcRelease(m.f.ptr, m.priv, m.own); err == nil {
			err = rerr
		}
	})
	b.d.shadows.drop(m.f.owner.id)
	b.d.zeros.drop(m.f.owner.id)
	if err != nil {
		return fmt.Errorf("kernels/cuda: CloseIPC: %w", err)
	}
	return nil
}

// Fence waits until the device has run the work queued so far on this
// backend's stream (the compute stream, or the communication stream for a
// CommBackend), then returns the backend's first error. The wait is on the
// waiter thread (async.go), so the device thread goes on queueing work
// meanwhile.
func (b *Backend) Fence() error {
	if b.failed() {
		return b.firstErr()
	}
	done := make(chan error, 1)
	b.d.post(func() {
		var ev any
		err := b.onStream(func() (err error) { ev, err = b.d.drv.fence(); return err })()
		if err != nil {
			done <- err
			return
		}
		b.d.awaitThen(ev, func(err error) { done <- err })
	})
	if err := <-done; err != nil {
		b.failf("fence: %v", err)
	}
	return b.firstErr()
}

// CommBackend is a backend on the same device that queues its work on the
// device's communication stream instead of the compute stream, with its own
// sticky error: the all-reduce's device ring (allreduce.DeviceMem) copies
// and reduces gradients there while backward goes on. Its work waits for
// the compute stream only where Join says so.
func (b *Backend) CommBackend() kernels.Backend[float32] {
	return &Backend{d: b.d, status: b.status, comm: true}
}

// Join makes the work this backend queues from now on wait for everything
// queued so far on the compute stream (a no-op for a compute-stream
// backend): a device collective joins before it reads the gradient that
// backward's queued kernels produce.
func (b *Backend) Join() {
	if b.comm {
		b.queue("join", b.d.drv.joinComm)
	}
}
