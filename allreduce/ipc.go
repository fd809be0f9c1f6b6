package allreduce

import (
	"context"
	"encoding/base64"
	"fmt"
	"strings"
	"sync/atomic"
	"unsafe"

	"google.golang.org/grpc/metadata"

	"github.com/bmojo/bmojo/kernels"
	pb "github.com/bmojo/bmojo/proto/allreducepb"
)

// The GPU-resident same-host path (Transport "cuda-ipc"): the shared-memory
// path (shm.go) with the slot payloads in device memory, so gradients that
// live on the GPU never visit the host. It is that path's twin, not a ring
// of its own: the same file, negotiation, slot headers, head and tail
// counters, consumer loop (Ring.consume) and checks; only where a slot's
// payload lies and who moves it differ.
//
//   - Negotiation. A sender configured "cuda-ipc" offers the shared-memory
//     file as usual and adds "bmojo-ipc: offer" to the first stream's
//     request metadata. A receiver configured "cuda-ipc" that accepts the
//     file allocates a device twin of its slot rings (Device.AllocIPC:
//     queues × slots × chunk floats), exports it and answers "bmojo-ipc:
//     ok <base64 handle>" beside "bmojo-shm: ok" (or "declined: <why>").
//     The sender opens the handle (Device.OpenIPC) and marks the file
//     header (shmHdrIPC) so that the receiver's Transport reports the hop.
//     Anything failing on the way (no answer, another host, a refusal, a
//     handle the driver cannot open, as in the same process) leaves the hop
//     on shared memory with host copies; the job never fails for it.
//   - Data. For a collective on device memory (StartDevice) the sender
//     copies each chunk from the caller's buffer into the successor's
//     device slot (Copy, device to device; across GPUs the driver routes
//     it), waits for the copy (Fence), then publishes head+1 exactly as the
//     host path does; the slot header says where the payload lies
//     (slotWhere). The consumer validates the header as before, then adds
//     (reduce-scatter) or copies (all-gather) the device slot into the
//     caller's buffer with a GPU kernel (Accumulate, Copy; Scale finishes
//     an Avg), waits, and frees the slot with tail+1. Each segment is
//     reduced once, by one rank, in the ring's order, so every rank ends
//     bitwise identical, as on every other path.
//   - Mixed ends. Every combination works, slot by slot: a sender whose
//     successor could not open the handle downloads the chunk into the host
//     slot; a receiver running the collective on the device uploads a host
//     slot into its own device slot before reducing; one running it on the
//     host downloads a device slot into the host slot first. A device
//     collective on a rank whose hops are not both shared memory (gRPC,
//     sockets, bf16 on the wire) runs on a host copy of the buffer
//     (download, the host collective, upload).
//
// The file keeps its host slots whatever the answer (they are the fallback,
// and it is made before the answer comes), so a cuda-ipc hop holds the
// default 8 MiB of host memory beside the 8 MiB on the receiver's GPU.

// DeviceMem is the GPU memory of a rank's cuda-ipc hops and device
// collectives: the kernels/cuda backend (*cuda.Backend) implements it.
// Buffers are float32 (kernels.Buffer of that backend). Copy, Accumulate and
// Scale only queue work on the device's stream (in order); Upload and
// Download copy at their place in that order; Fence waits for everything
// queued so far and returns the first error the device recorded. Methods
// may be called from several goroutines.
type DeviceMem interface {
	// AllocIPC returns n floats of device memory another process can map
	// (its contents undefined), ExportIPC the handle that process passes
	// to OpenIPC, which maps the first n floats; CloseIPC frees an
	// allocation or unmaps a mapping. OpenIPC fails (never panics) on bad
	// or foreign handle bytes.
	AllocIPC(n int) (kernels.Buffer, error)
	ExportIPC(buf kernels.Buffer) ([]byte, error)
	OpenIPC(handle []byte, n int) (kernels.Buffer, error)
	CloseIPC(buf kernels.Buffer) error
	// Slice is the view [off, off+n) of x.
	Slice(x kernels.Buffer, off, n int) kernels.Buffer
	// Copy: dst = src; Accumulate: dst += src (float32 adds, one per
	// element, as the host path's); Scale: x *= s.
	Copy(dst, src kernels.Buffer)
	Accumulate(dst, src kernels.Buffer)
	Scale(x kernels.Buffer, s float64)
	Upload(dst kernels.Buffer, src []float32)
	Download(dst []float32, src kernels.Buffer)
	Fence() error
	// Join makes the work queued from now on wait for the work the
	// caller's compute queued so far (a device whose ops run on a stream
	// of their own; otherwise a no-op): StartDevice joins before it reads
	// the buffer.
	Join()
}

// ipcMetaKey is the request-metadata key of a sender's offer ("offer") and
// the response-header key of the receiver's answer ("ok <base64 handle>",
// or "declined: <why>").
const ipcMetaKey = "bmojo-ipc"

// shmHdrIPC is a word of the file header (after the fields checkShmHeader
// reads, before the queues' control blocks) that the sender sets to 1 once
// it has opened the receiver's device slots.
const shmHdrIPC = 48

// Where a slot's payload lies (slot header byte slotWhereOff).
const (
	slotWhereOff = 6
	slotInHost   = 0
	slotInDevice = 1
)

// shmIPC is a region's device side (nil on a host-only hop): the
// receiver's own device slot rings, or on the sender the mapping of its
// successor's.
type shmIPC struct {
	dev       kernels.Buffer
	slotElems int // floats per slot
	slots     int // per queue
	own       bool
}

// slot is the device view of slot seq of queue q, its first n floats.
func (d *shmIPC) slot(dm DeviceMem, q int, seq uint64, n int) kernels.Buffer {
	i := q*d.slots + int(seq%uint64(d.slots))
	return dm.Slice(d.dev, i*d.slotElems, n)
}

func ipcGeometry(g shmGeometry) (slotElems, total int) {
	slotElems = (g.slotBytes - slotHdrBytes) / 4
	return slotElems, g.queues * g.slots * slotElems
}

// ipcFlag is the header word shmHdrIPC.
func (s *shmRegion) ipcFlag() *atomic.Uint32 {
	if len(s.mem) < shmHdrBytes {
		return nil // unmapped
	}
	return (*atomic.Uint32)(unsafe.Pointer(&s.mem[shmHdrIPC]))
}

// ipcOffered reports whether a stream's request carries a cuda-ipc offer.
func ipcOffered(ctx context.Context) bool {
	md, _ := metadata.FromIncomingContext(ctx)
	v := md.Get(ipcMetaKey)
	return len(v) == 1 && v[0] == "offer"
}

// ipcExport allocates and exports the device slots of a region the
// predecessor offered (receiver side, before its consumers start) and
// returns the answer for the response headers.
func (r *Ring) ipcExport(reg *shmRegion) string {
	dm := r.cfg.Device
	slotElems, total := ipcGeometry(reg.geo)
	buf, err := dm.AllocIPC(total)
	if err != nil {
		r.log.Info("cuda-ipc: cannot allocate device slots, the predecessor's hop stays on host shared memory", "error", err)
		return "declined: " + metaSafe(err.Error())
	}
	h, err := dm.ExportIPC(buf)
	if err != nil {
		_ = dm.CloseIPC(buf)
		r.log.Info("cuda-ipc: cannot export device slots, the predecessor's hop stays on host shared memory", "error", err)
		return "declined: " + metaSafe(err.Error())
	}
	reg.ipc = &shmIPC{dev: buf, slotElems: slotElems, slots: reg.geo.slots, own: true}
	return "ok " + base64.StdEncoding.EncodeToString(h)
}

// ipcOpen maps the successor's device slots from its answer (sender side);
// on any failure the hop stays on host shared memory.
func (r *Ring) ipcOpen(reg *shmRegion, md metadata.MD) {
	ans := md.Get(ipcMetaKey)
	if len(ans) != 1 || !strings.HasPrefix(ans[0], "ok ") {
		r.log.Info("cuda-ipc: the successor did not export device slots, its hop uses host shared memory", "answer", ans)
		return
	}
	h, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(ans[0], "ok "))
	if err != nil {
		r.log.Info("cuda-ipc: the successor's handle is not base64, its hop uses host shared memory", "error", err)
		return
	}
	slotElems, total := ipcGeometry(reg.geo)
	buf, err := r.cfg.Device.OpenIPC(h, total)
	if err != nil {
		r.log.Info("cuda-ipc: cannot open the successor's device slots, its hop uses host shared memory", "error", err)
		return
	}
	reg.ipc = &shmIPC{dev: buf, slotElems: slotElems, slots: reg.geo.slots}
	reg.ipcFlag().Store(1)
}

// ipcRelease frees or unmaps a region's device slots (Close, or a region
// given up); nothing may use them any more.
func (r *Ring) ipcRelease(reg *shmRegion) {
	if reg == nil || reg.ipc == nil {
		return
	}
	if err := r.cfg.Device.CloseIPC(reg.ipc.dev); err != nil {
		r.log.Warn("cuda-ipc: releasing device slots", "error", err)
	}
	reg.ipc = nil
}

// StartDevice is Start for a buffer in device memory (a buffer of
// Config.Device, float32): with a cuda-ipc hop on both sides the chunks move
// between the GPUs and are reduced there; otherwise (gRPC, sockets, host
// shared memory, bf16 on the wire) the collective runs on a host copy of
// buf, downloaded first and uploaded when done. Either way every rank ends
// with the same bits. buf belongs to the ring until the handle is done;
// work the caller queued on the device before StartDevice is done first.
func (r *Ring) StartDevice(buf kernels.Buffer, op Op) *Handle {
	return r.startDevice(buf, op, partAll, true)
}

// startDevice starts part k of a device collective; join makes the device's
// work wait for the caller's compute queued so far (Hier joins once, when
// its collective starts, not again for each phase).
func (r *Ring) startDevice(buf kernels.Buffer, op Op, k part, join bool) *Handle {
	if r.cfg.Device == nil || buf == nil {
		h := &Handle{rank: r.rank, done: make(chan struct{})}
		h.err = fmt.Errorf("allreduce: rank %d: a device collective needs Config.Device and a buffer: %w", r.rank, ErrConfig)
		close(h.done)
		return h
	}
	if join {
		r.cfg.Device.Join() // after the kernels that produced buf
	}
	return r.startHandle(&Handle{rank: r.rank, dev: buf, kind: op, part: k, done: make(chan struct{})})
}

// AllReduceDevice is StartDevice and waiting for it; see AllReduce for what
// ctx ending does.
func (r *Ring) AllReduceDevice(ctx context.Context, buf kernels.Buffer, op Op) error {
	return r.await(ctx, r.StartDevice(buf, op))
}

// DeviceNative reports whether StartDevice reduces on the device here (both
// hops on shared memory, this rank's inbound one with device slots) rather
// than on a host copy of the buffer: a caller with the data on the GPU and
// its own way to overlap host copies (the worker's reducer) takes the
// device path only then. Fixed once Connect has returned.
func (r *Ring) DeviceNative() bool { return r.ipcNative() }

// ipcNative reports whether device collectives run on the device here:
// both hops on shared memory, this rank's inbound with device slots, and
// float32 on the wire.
func (r *Ring) ipcNative() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.cfg.Device != nil && r.dtype == pb.DType_DTYPE_F32 &&
		r.shmOut != nil && r.shmIn != nil && r.shmIn.ipc != nil
}

// runStaged runs a device collective on a host copy of its buffer.
func (r *Ring) runStaged(h *Handle) error {
	dm := r.cfg.Device
	buf := make([]float32, h.dev.Len())
	dm.Download(buf, h.dev)
	if err := dm.Fence(); err != nil {
		return fmt.Errorf("allreduce: rank %d op %d: downloading the device buffer: %w", r.rank, h.op, err)
	}
	hh := &Handle{rank: h.rank, op: h.op, buf: buf, kind: h.kind, part: h.part}
	if err := r.run(hh); err != nil {
		return err
	}
	dm.Upload(h.dev, buf)
	if err := dm.Fence(); err != nil {
		return fmt.Errorf("allreduce: rank %d op %d: uploading the result: %w", r.rank, h.op, err)
	}
	return nil
}

// deviceErr wraps a device failure during a collective (not a peer's fault:
// the ring breaks blaming no neighbour).
func (r *Ring) deviceErr(op *opState, what string, err error) error {
	return fmt.Errorf("allreduce: rank %d op %d: cuda-ipc %s: %w", r.rank, op.id, what, err)
}

// ipcFillSlot writes chunk [lo,hi) of a device collective into slot seq of
// queue q: device to device when the successor's slots are mapped, else
// downloaded into the host slot. It returns where the payload went.
func (r *Ring) ipcFillSlot(op *opState, reg *shmRegion, q int, seq uint64, slot []byte, lo, hi int) (byte, error) {
	dm := r.cfg.Device
	n := hi - lo
	if n == 0 {
		return slotInHost, nil
	}
	src := dm.Slice(op.dev, lo, n)
	where := byte(slotInHost)
	if reg.ipc != nil {
		dm.Copy(reg.ipc.slot(dm, q, seq, n), src)
		where = slotInDevice
	} else {
		dm.Download(bytesF32(slot[slotHdrBytes:slotHdrBytes+4*n]), src)
	}
	if err := dm.Fence(); err != nil {
		return 0, r.deviceErr(op, "copy to the successor", err)
	}
	return where, nil
}

// ipcApplySlot reduces (or copies) a validated slot into a device
// collective's buffer on the GPU.
func (r *Ring) ipcApplySlot(op *opState, reg *shmRegion, q int, seq uint64, h *pb.FrameHeader, where byte, payload []byte) error {
	idx, lo, hi, err := r.admitRange(op, h)
	if err != nil {
		return err
	}
	dm := r.cfg.Device
	p := op.plan
	s := int(h.GetStep())
	if n := hi - lo; n > 0 {
		src := reg.ipc.slot(dm, q, seq, n)
		if where == slotInHost {
			dm.Upload(src, bytesF32(payload[:4*n]))
		}
		dst := dm.Slice(op.dev, lo, n)
		if p.IsReduce(s) {
			dm.Accumulate(dst, src)
		} else {
			dm.Copy(dst, src)
		}
		if p.Finishes(s) && op.kind == Avg {
			dm.Scale(dst, 1/float64(r.n))
		}
		if err := dm.Fence(); err != nil {
			return r.deviceErr(op, "reduce", err)
		}
	}
	r.stats.FramesRecv.Add(1)
	r.stats.BytesRecv.Add(uint64(4 * (hi - lo)))
	close(op.done[idx])
	return nil
}

// ipcSlotToHost brings a device slot's payload into the host slot, for a
// collective this rank runs on host memory.
func (r *Ring) ipcSlotToHost(op *opState, reg *shmRegion, q int, seq uint64, payload []byte) error {
	n := len(payload) / 4
	if n == 0 {
		return nil
	}
	dm := r.cfg.Device
	dm.Download(bytesF32(payload), reg.ipc.slot(dm, q, seq, n))
	if err := dm.Fence(); err != nil {
		return r.deviceErr(op, "download of a device slot", err)
	}
	return nil
}

// bytesF32 is b as float32 (b's length a multiple of 4, 4-byte aligned: slot
// payloads are 64-byte aligned).
func bytesF32(b []byte) []float32 {
	if len(b) < 4 {
		return nil
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), len(b)/4)
}
