//go:build cuda

package cuda

import (
	"embed"
	"fmt"
	"io/fs"
	"runtime"
	"sort"
	"strings"
	"sync"
	"unsafe"

	"gorgonia.org/cu"

	"github.com/bmojo/bmojo/kernels"
)

// Built reports whether this binary contains the CUDA backend.
const Built = true

//go:embed ptx/*.ptx
var ptxFiles embed.FS

// Device is one GPU: its context, the OS thread that owns it, one stream,
// the loaded kernels, cuBLAS and the memory cache.
type Device struct {
	info   Info
	opt    Options
	work   chan func()
	closed chan struct{}
	once   sync.Once

	// Owned by the device thread.
	ctx    cu.CUContext
	dev    cu.Device
	stream cu.Stream
	mods   []cu.Module
	fns    map[string]cu.Function
	mem    *cache
	blas   *cublas
	argv   []unsafe.Pointer
	slots  []uint64
}

// Open starts device ordinal: retains its primary context on a new locked
// OS thread, creates the stream, loads the embedded PTX and cuBLAS.
func Open(ordinal int, opt Options) (*Device, error) {
	switch opt.MatMul {
	case "":
		opt.MatMul = "bf16"
	case "bf16", "fp32":
	default:
		return nil, fmt.Errorf("cuda: matmul precision %q: want bf16 or fp32", opt.MatMul)
	}
	d := &Device{opt: opt, work: make(chan func()), closed: make(chan struct{}), fns: map[string]cu.Function{}}
	started := make(chan error, 1)
	go d.loop(ordinal, started)
	if err := <-started; err != nil {
		return nil, err
	}
	return d, nil
}

func (d *Device) loop(ordinal int, started chan<- error) {
	runtime.LockOSThread() // the context stays bound to this thread for good
	if err := d.start(ordinal); err != nil {
		started <- err
		return
	}
	started <- nil
	for {
		select {
		case f := <-d.work:
			f()
		case <-d.closed:
			d.stop()
			return
		}
	}
}

func (d *Device) start(ordinal int) error {
	// gorgonia.org/cu initialises the driver when the program starts.
	n, err := cu.NumDevices()
	if err != nil {
		return fmt.Errorf("cuda: counting devices: %w", err)
	}
	if ordinal < 0 || ordinal >= n {
		return fmt.Errorf("cuda: device %d does not exist (this machine has %d)", ordinal, n)
	}
	dev, err := cu.GetDevice(ordinal)
	if err != nil {
		return fmt.Errorf("cuda: device %d: %w", ordinal, err)
	}
	d.dev = dev
	ctx, err := dev.RetainPrimaryCtx()
	if err != nil {
		return fmt.Errorf("cuda: device %d: retaining its context: %w", ordinal, err)
	}
	d.ctx = ctx
	if err := cu.SetCurrentContext(ctx); err != nil {
		return fmt.Errorf("cuda: device %d: making its context current: %w", ordinal, err)
	}
	d.info.Ordinal = ordinal
	d.info.Name, _ = dev.Name()
	d.info.MemTotal, _ = dev.TotalMem()
	d.info.Driver = cu.Version()
	d.info.ComputeMajor, _ = dev.Attribute(cu.ComputeCapabilityMajor)
	d.info.ComputeMinor, _ = dev.Attribute(cu.ComputeCapabilityMinor)
	d.info.SMs, _ = dev.Attribute(cu.MultiprocessorCount)
	if d.stream, err = cu.MakeStream(cu.NonBlocking); err != nil {
		return fmt.Errorf("cuda: creating a stream: %w", err)
	}
	if err := d.loadModules(); err != nil {
		return err
	}
	d.mem = newCache(d)
	b, err := loadCublas(streamHandle(d.stream), d.opt.MatMul == "bf16")
	if err != nil {
		return err
	}
	d.blas = b
	d.info.CuBLAS = b.lib
	return nil
}

func (d *Device) loadModules() error {
	names, err := fs.Glob(ptxFiles, "ptx/*.ptx")
	if err != nil || len(names) == 0 {
		return fmt.Errorf("cuda: no embedded PTX (run make ptx): %v", err)
	}
	sort.Strings(names)
	for _, name := range names {
		src, err := ptxFiles.ReadFile(name)
		if err != nil {
			return err
		}
		mod, err := cu.LoadData(string(src))
		if err != nil {
			if strings.Contains(err.Error(), "Unsupported PTX") || strings.Contains(err.Error(), "UnsupportedPTX") {
				return fmt.Errorf("cuda: the driver (CUDA %d.%d) cannot compile %s: it is older than the PTX (ISA 7.8, CUDA 11.8); update the NVIDIA driver: %w",
					d.info.Driver/1000, d.info.Driver%1000/10, name, err)
			}
			return fmt.Errorf("cuda: loading %s: %w", name, err)
		}
		d.mods = append(d.mods, mod)
	}
	return nil
}

func (d *Device) stop() {
	d.blas.close()
	d.mem.releaseAll()
	for _, m := range d.mods {
		_ = m.Unload()
	}
	_ = d.dev.ReleasePrimaryCtx()
}

// do runs f on the device thread and waits for it.
func (d *Device) do(f func()) {
	done := make(chan struct{})
	d.work <- func() { f(); close(done) }
	<-done
}

// Close waits for queued work, frees the device's memory and releases the
// context. Buffers of the device must not be used afterwards.
func (d *Device) Close() error {
	var err error
	d.once.Do(func() {
		d.do(func() { err = d.stream.Synchronize() })
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

// function returns kernel name from the loaded modules. Device thread only.
func (d *Device) function(name string) (cu.Function, error) {
	if f, ok := d.fns[name]; ok {
		return f, nil
	}
	for _, m := range d.mods {
		if f, err := m.Function(name); err == nil {
			d.fns[name] = f
			return f, nil
		}
	}
	return cu.Function{}, fmt.Errorf("cuda: kernel %s is in no loaded module", name)
}

// dim is a launch geometry.
type dim struct{ x, y, z int }

// grid1 covers n items with blocks of threads.
func grid1(n, threads int) dim { return dim{(n + threads - 1) / threads, 1, 1} }

// launch queues kernel name on the stream. Device thread only. Arguments:
// *floats/*ints (nil = null pointer) become device pointers, int becomes a
// C int, int64 a long long, float32 a float, float64 a double, uint64 a raw
// 8-byte value.
func (d *Device) launch(name string, grid, block dim, shmem int, args ...any) error {
	fn, err := d.function(name)
	if err != nil {
		return err
	}
	if cap(d.slots) < len(args) {
		d.slots = make([]uint64, len(args))
		d.argv = make([]unsafe.Pointer, len(args))
	}
	slots, argv := d.slots[:len(args)], d.argv[:len(args)]
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
		argv[i] = unsafe.Pointer(&slots[i])
	}
	if grid.x == 0 || grid.y == 0 || grid.z == 0 {
		return nil // nothing to do
	}
	if err := fn.Launch(grid.x, grid.y, grid.z, block.x, block.y, block.z, shmem, d.stream, argv); err != nil {
		return fmt.Errorf("cuda: launching %s (grid %v, block %v, %d B shared): %w", name, grid, block, shmem, err)
	}
	return nil
}

// streamHandle is the raw CUstream of s, for cuBLAS.
func streamHandle(s cu.Stream) unsafe.Pointer { return *(*unsafe.Pointer)(unsafe.Pointer(&s)) }
