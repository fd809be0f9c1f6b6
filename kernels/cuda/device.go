//go:build cuda

package cuda

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"

	"github.com/bmojo/bmojo/kernels"
)

// devptr is a device address.
type devptr uint64

// driver is what a Device needs from the machine: the CUDA driver API on a
// GPU (driver_cuda.go) or the CPU emulation of the same kernel sources
// (driver_emu.go, build tag cudaemu). Every method runs on the device thread.
type driver interface {
	start(ordinal int, opt Options) (Info, error)
	stop()
	malloc(bytes int64) (devptr, error)
	free(p devptr) error
	memInfo() (free, total int64)
	memset32(p devptr, n int64) error         // zero n words
	fill32(p devptr, n int64, v uint32) error // set n words to v
	htod(dst devptr, src unsafe.Pointer, bytes int64) error
	dtoh(dst unsafe.Pointer, src devptr, bytes int64) error // waits for the copy
	dtod(dst, src devptr, bytes int64) error
	// sync waits for every stream: the main one, the copy stream and the
	// communication stream.
	sync() error
	// useComm(true) makes the calls that queue work (launches, copies,
	// memsets, fence) queue it on the communication stream until
	// useComm(false); joinComm makes that stream wait for the work queued
	// so far on the main one (Backend.CommBackend, Backend.Join).
	useComm(on bool)
	joinComm() error
	// The async copies (async.go). hostAlloc returns page-locked host
	// memory, which copies reach without staging through the driver;
	// dtohAsync queues a copy on the copy stream that starts once the work
	// queued so far on the main stream is done, and returns a token of its
	// end; fence is a token of the end of the work queued so far on the
	// main stream. await waits for a token's end and releases it: it runs
	// on the waiter thread (bind made the context current there), never on
	// the device thread.
	hostAlloc(bytes int64) (unsafe.Pointer, error)
	hostFree(p unsafe.Pointer) error
	dtohAsync(dst unsafe.Pointer, src devptr, bytes int64) (any, error)
	fence() (any, error)
	bind() error
	await(token any) error
	// tunings reports how each product shape's cuBLASLt algorithm was
	// chosen (Options.NoGemmTune); nil without cuBLASLt.
	tunings() []GemmTuning
	// mark records a point in the stream; since gives the milliseconds
	// between two marks once the stream has passed both (bench timing).
	mark() (any, error)
	since(from, to any) (float64, error)
	launch(name string, grid, block dim, shmem int, args []uint64) error
	// gemm is cuBLAS's column-major C = alpha·op(A)·op(B) + beta·C; C is
	// float32, A and B float32 or (bf16in) bfloat16.
	// With beta ≠ 0 and Cin set, beta·C reads Cin instead (C = alpha·op(A)·op(B) + beta·Cin).
	gemm(transA, transB bool, m, n, k int, alpha float32, A devptr, lda int, B devptr, ldb int, beta float32, C, Cin devptr, ldc int, bf16in bool) error
}

// Device is one GPU: the OS thread that owns its context, the driver and the
// memory cache.
type Device struct {
	info   Info
	opt    Options
	work   chan func()
	closed chan struct{}
	once   sync.Once

	// Owned by the device thread.
	drv   driver
	mem   *cache
	slots []uint64
	half  [3]*allocation // scratch bf16 copies of matrix-product inputs (ops_matmul.go)
	halfN [3]int64       // their capacity, in bf16 values

	// shadows are the bf16 copies products keep (shadow.go); used by the
	// calling goroutines.
	shadows shadowTable
	// zeros are the deferred Zero calls (lazyzero.go), likewise.
	zeros zeroTable

	// staging is the page-locked host memory of async copies (async.go);
	// waits queues work for the waiter thread, which waits for their ends.
	staging stagingPool
	waits   chan func(bound error)

	// Stream events around queued work while timing (timing.go); device
	// thread.
	timing bool
	// timingKernels: one timing row per kernel launch (StartTiming).
	timingKernels bool
	timedOps      []timedOp
}

// Open starts device ordinal on a new locked OS thread.
func Open(ordinal int, opt Options) (*Device, error) {
	switch opt.MatMul {
	case "":
		opt.MatMul = "bf16"
	case "bf16", "fp32":
	default:
		return nil, fmt.Errorf("cuda: matmul precision %q: want bf16 or fp32", opt.MatMul)
	}
	d := &Device{opt: opt, work: make(chan func(), 1024), waits: make(chan func(error), 1024), closed: make(chan struct{}), drv: newDriver()}
	started := make(chan error, 1)
	go d.loop(ordinal, started)
	if err := <-started; err != nil {
		return nil, err
	}
	return d, nil
}

func (d *Device) loop(ordinal int, started chan<- error) {
	runtime.LockOSThread() // the context stays bound to this thread for good
	info, err := d.drv.start(ordinal, d.opt)
	if err != nil {
		started <- err
		return
	}
	d.info = info
	d.mem = newCache(d.drv)
	d.mem.freed = func(id uint64) {
		d.shadows.drop(id)
		d.zeros.drop(id)
	}
	d.mem.pressure = d.shadows.dropAll
	go d.waitLoop()
	started <- nil
	for {
		select {
		case f := <-d.work:
			f()
		case <-d.closed:
			d.mem.releaseCached()
			d.staging.release(d.drv)
			d.drv.stop()
			return
		}
	}
}

// waitLoop is the waiter thread: it waits for the ends of async copies
// (async.go) so that the device thread never does, and runs what follows
// them. Each item gets the error of binding the context to this thread
// (nil normally), so that none waits on a thread that cannot.
func (d *Device) waitLoop() {
	runtime.LockOSThread() // the context is made current on this thread only
	bound := d.drv.bind()
	for {
		select {
		case f := <-d.waits:
			f(bound)
		case <-d.closed:
			return
		}
	}
}

// post queues f for the device thread and returns at once. Work runs in
// the order it was posted or done, so a later do sees its effects.
func (d *Device) post(f func()) { d.work <- f }

// do runs f on the device thread and waits for it.
func (d *Device) do(f func()) {
	done := make(chan struct{})
	d.work <- func() { f(); close(done) }
	<-done
}

// settle returns once the device thread has run the work queued so far and
// the waiter thread what that work handed it (the ends of async copies,
// which it waits for in order).
func (d *Device) settle() {
	settled := make(chan struct{})
	d.do(func() { d.waits <- func(error) { close(settled) } })
	<-settled
}

// Close waits for queued work, frees the device's memory and releases the
// context. Buffers of the device must not be used afterwards.
func (d *Device) Close() error {
	var err error
	d.once.Do(func() {
		d.do(func() { err = d.drv.sync() })
		// What the waiter thread still holds (releasing the staging of
		// async uploads) is done before the context goes.
		d.settle()
		close(d.closed)
	})
	return err
}

// Info describes the device.
func (d *Device) Info() Info { return d.info }

// Backend returns a new backend on this device with its own error state;
// backends of one device share its stream, kernels and memory.
func (d *Device) Backend() kernels.Backend[float32] { return d.NewBackend() }

// NewBackend is Backend with the concrete type.
func (d *Device) NewBackend() *Backend {
	b := &Backend{d: d}
	b.status = b.AllocInt(statusWords).(*ints)
	return b
}

// PeakMemory is the most device memory this Device has held at once (bytes,
// cached blocks included).
func (d *Device) PeakMemory() int64 {
	var p int64
	d.do(func() { p = d.mem.peak })
	return p
}

// dim is a launch geometry.
type dim struct{ x, y, z int }

// grid1 covers n items with blocks of threads.
func grid1(n, threads int) dim { return dim{(n + threads - 1) / threads, 1, 1} }

// launch queues kernel name. Device thread only. Arguments: *floats/*ints
// (nil = null pointer) become device pointers, int a C int, int64 a long
// long, float32 a float, float64 a double, uint64 a raw 8-byte value.
func (d *Device) launch(name string, grid, block dim, shmem int, args ...any) error {
	if cap(d.slots) < len(args) {
		d.slots = make([]uint64, len(args))
	}
	slots := d.slots[:len(args)]
	for i, a := range args {
		switch v := a.(type) {
		case *floats:
			slots[i] = 0
			if v != nil {
				slots[i] = uint64(v.ptr)
			}
		case *ints:
			slots[i] = 0
			if v != nil {
				slots[i] = uint64(v.ptr)
			}
		case *bf16Ref: // a bf16 copy the kernel reads (ops_matmul.go)
			slots[i] = uint64(v.ptr)
		case *shadow: // a bf16 copy written by the kernel (shadow.go)
			slots[i] = 0
			if v != nil {
				slots[i] = uint64(d.storage(v))
			}
		case int:
			slots[i] = uint64(uint32(int32(v)))
		case int64:
			slots[i] = uint64(v)
		case uint64:
			slots[i] = v
		case float32:
			slots[i] = uint64(*(*uint32)(unsafe.Pointer(&v)))
		case float64:
			slots[i] = *(*uint64)(unsafe.Pointer(&v))
		default:
			return fmt.Errorf("cuda: %s: argument %d has unsupported type %T", name, i, a)
		}
	}
	if grid.x <= 0 || grid.y <= 0 || grid.z <= 0 {
		return nil // nothing to do
	}
	if err := d.drv.launch(name, grid, block, shmem, slots); err != nil {
		return fmt.Errorf("cuda: launching %s (grid %v, block %v, %d B shared): %w", name, grid, block, shmem, err)
	}
	return nil
}
