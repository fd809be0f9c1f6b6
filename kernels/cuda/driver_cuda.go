//go:build cuda && !cudaemu

package cuda

import (
	"embed"
	"fmt"
	"io/fs"
	"sort"
	"strings"
	"unsafe"

	"gorgonia.org/cu"
)

// Built reports whether this binary contains the CUDA backend.
const Built = true

// Emulated reports whether the backend is the CPU emulation (cudaemu).
const Emulated = false

//go:embed ptx/*.ptx
var ptxFiles embed.FS

// gpu is the driver of a real GPU: the device's primary context (which
// cuBLAS shares), one non-blocking stream for every op, a second one for
// async downloads (async.go), a third for the all-reduce's device ring
// (CommBackend), the modules JIT-compiled from the embedded PTX, and
// cuBLAS.
type gpu struct {
	dev    cu.Device
	ctx    cu.CUContext
	stream cu.Stream
	copies cu.Stream
	// comm is the all-reduce's stream (Backend.CommBackend): the device
	// ring's copies and reductions run there, beside the compute stream.
	// cur is the stream the calls below queue on: stream, or comm while a
	// communication op runs (useComm; device thread only).
	comm, cur cu.Stream
	mods      []cu.Module
	fns       map[string]cu.Function
	blas      *cublas
	lt        *cublasLt    // nil: bf16 products through cublasGemmEx
	ws        cu.DevicePtr // cuBLAS workspace, shared with cuBLASLt
	noTune    bool         // keep cuBLASLt's first guess (Options.NoGemmTune)
}

func newDriver() driver { return &gpu{fns: map[string]cu.Function{}} }

// deviceUUID is d's UUID as NVML writes it ("GPU-" and the hex groups).
func deviceUUID(d cu.Device) (string, error) {
	u, err := d.UUID()
	if err != nil {
		return "", err
	}
	return "GPU-" + u.String(), nil
}

// Visible returns the UUIDs of the GPUs the CUDA driver shows this process,
// in ordinal order: device i is cuda:i. CUDA_VISIBLE_DEVICES and
// CUDA_DEVICE_ORDER change that list and order; NVML ignores them.
func Visible() ([]string, error) {
	n, err := cu.NumDevices()
	if err != nil {
		return nil, fmt.Errorf("cuda: counting devices: %w", err)
	}
	out := make([]string, n)
	for i := range out {
		d, err := cu.GetDevice(i)
		if err == nil {
			out[i], err = deviceUUID(d)
		}
		if err != nil {
			return nil, fmt.Errorf("cuda: device %d: %w", i, err)
		}
	}
	return out, nil
}

func (g *gpu) start(ordinal int, opt Options) (Info, error) {
	var info Info
	// gorgonia.org/cu initialises the driver when the program starts.
	n, err := cu.NumDevices()
	if err != nil {
		return info, fmt.Errorf("cuda: counting devices: %w", err)
	}
	if ordinal < 0 || ordinal >= n {
		return info, fmt.Errorf("cuda: device %d does not exist (this machine has %d)", ordinal, n)
	}
	if g.dev, err = cu.GetDevice(ordinal); err != nil {
		return info, fmt.Errorf("cuda: device %d: %w", ordinal, err)
	}
	if g.ctx, err = g.dev.RetainPrimaryCtx(); err != nil {
		return info, fmt.Errorf("cuda: device %d: retaining its context: %w", ordinal, err)
	}
	if err := cu.SetCurrentContext(g.ctx); err != nil {
		return info, fmt.Errorf("cuda: device %d: making its context current: %w", ordinal, err)
	}
	info.Ordinal = ordinal
	info.Name, _ = g.dev.Name()
	info.MemTotal, _ = g.dev.TotalMem()
	info.Driver = cu.Version()
	info.ComputeMajor, _ = g.dev.Attribute(cu.ComputeCapabilityMajor)
	info.ComputeMinor, _ = g.dev.Attribute(cu.ComputeCapabilityMinor)
	info.SMs, _ = g.dev.Attribute(cu.MultiprocessorCount)
	info.UUID, _ = deviceUUID(g.dev)
	if g.stream, err = cu.MakeStream(cu.NonBlocking); err != nil {
		return info, fmt.Errorf("cuda: creating a stream: %w", err)
	}
	if g.copies, err = cu.MakeStream(cu.NonBlocking); err != nil {
		return info, fmt.Errorf("cuda: creating the copy stream: %w", err)
	}
	if g.comm, err = cu.MakeStream(cu.NonBlocking); err != nil {
		return info, fmt.Errorf("cuda: creating the communication stream: %w", err)
	}
	g.cur = g.stream
	if err := g.loadModules(info); err != nil {
		return info, err
	}
	if g.blas, err = loadCublas(*(*unsafe.Pointer)(unsafe.Pointer(&g.stream)), opt.MatMul == "bf16"); err != nil {
		return info, err
	}
	info.CuBLAS = g.blas.lib
	// 32 MiB of cuBLAS workspace, as PyTorch gives it on Hopper: some of the
	// fastest kernels (split-K among them) need more than the default.
	const wsBytes = 32 << 20
	if g.ws, err = cu.MemAlloc(wsBytes); err != nil {
		return info, fmt.Errorf("cuda: allocating the cuBLAS workspace: %w", err)
	}
	if err := g.blas.setWorkspace(uint64(g.ws), wsBytes); err != nil {
		return info, err
	}
	g.noTune = opt.NoGemmTune
	if opt.MatMul == "bf16" && !opt.NoCublasLt {
		// Without cuBLASLt, every product goes through cublasGemmEx.
		if lt, err := loadCublasLt(g.blas.lib, uint64(g.ws), wsBytes); err == nil {
			g.lt = lt
			info.CuBLAS += " + " + lt.lib
		} else {
			info.CuBLAS += fmt.Sprintf(" (no cuBLASLt: %v)", err)
		}
	}
	return info, nil
}

func (g *gpu) loadModules(info Info) error {
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
			if strings.Contains(strings.ToLower(err.Error()), "ptx") {
				return fmt.Errorf("cuda: the driver (CUDA %d.%d) cannot compile %s, built as PTX ISA 7.8 (CUDA 11.8) for sm_90; update the NVIDIA driver: %w",
					info.Driver/1000, info.Driver%1000/10, name, err)
			}
			return fmt.Errorf("cuda: loading %s: %w", name, err)
		}
		g.mods = append(g.mods, mod)
	}
	return nil
}

func (g *gpu) stop() {
	g.blas.close()
	_ = g.copies.Destroy()
	_ = g.comm.Destroy()
	if g.ws != 0 {
		_ = cu.MemFree(g.ws)
	}
	for _, m := range g.mods {
		_ = m.Unload()
	}
	_ = g.dev.ReleasePrimaryCtx()
}

func (g *gpu) function(name string) (cu.Function, error) {
	if f, ok := g.fns[name]; ok {
		return f, nil
	}
	for _, m := range g.mods {
		if f, err := m.Function(name); err == nil {
			g.fns[name] = f
			return f, nil
		}
	}
	return cu.Function{}, fmt.Errorf("kernel %s is in no loaded module", name)
}

func (g *gpu) malloc(bytes int64) (devptr, error) {
	p, err := cu.MemAlloc(bytes)
	return devptr(p), err
}

func (g *gpu) free(p devptr) error { return cu.MemFree(cu.DevicePtr(p)) }

func (g *gpu) memInfo() (free, total int64) {
	free, total, _ = cu.MemInfo()
	return free, total
}

func (g *gpu) memset32(p devptr, n int64) error {
	return cu.MemsetD32Async(cu.DevicePtr(p), 0, n, g.cur)
}

func (g *gpu) fill32(p devptr, n int64, v uint32) error {
	return cu.MemsetD32Async(cu.DevicePtr(p), uint(v), n, g.cur)
}

// htod copies from pageable host memory: the driver stages the source
// before returning, so the caller may reuse it at once.
func (g *gpu) htod(dst devptr, src unsafe.Pointer, bytes int64) error {
	return cu.MemcpyHtoDAsync(cu.DevicePtr(dst), src, bytes, g.cur)
}

func (g *gpu) dtoh(dst unsafe.Pointer, src devptr, bytes int64) error {
	if err := cu.MemcpyDtoHAsync(dst, cu.DevicePtr(src), bytes, g.cur); err != nil {
		return err
	}
	return g.cur.Synchronize()
}

func (g *gpu) dtod(dst, src devptr, bytes int64) error {
	return cu.MemcpyDtoDAsync(cu.DevicePtr(dst), cu.DevicePtr(src), bytes, g.cur)
}

func (g *gpu) tunings() []GemmTuning {
	if g.lt == nil {
		return nil
	}
	return g.lt.tunings()
}

func (g *gpu) sync() error {
	if err := g.stream.Synchronize(); err != nil {
		return err
	}
	if err := g.comm.Synchronize(); err != nil {
		return err
	}
	return g.copies.Synchronize()
}

func (g *gpu) hostAlloc(bytes int64) (unsafe.Pointer, error) { return memHostAlloc(bytes) }

func (g *gpu) hostFree(p unsafe.Pointer) error { return cu.MemFreeHost(p) }

// dtohAsync makes the copy stream wait for an event recorded after the
// work queued on the main stream, so the copy reads what that work wrote
// while the main stream goes on. dst must be page-locked (hostAlloc): from
// pageable memory the driver would copy synchronously.
func (g *gpu) dtohAsync(dst unsafe.Pointer, src devptr, bytes int64) (any, error) {
	after, err := cu.MakeEvent(cu.DisableTiming)
	if err != nil {
		return nil, err
	}
	// Destroying a recorded event is allowed: its resources go once the
	// device passes it, and the stream wait below has captured it.
	defer cu.DestroyEvent(&after)
	if err := after.Record(g.stream); err != nil {
		return nil, err
	}
	if err := g.copies.Wait(after, 0); err != nil {
		return nil, err
	}
	if err := cu.MemcpyDtoHAsync(dst, cu.DevicePtr(src), bytes, g.copies); err != nil {
		return nil, err
	}
	return g.record(g.copies)
}

func (g *gpu) fence() (any, error) { return g.record(g.cur) }

func (g *gpu) useComm(on bool) {
	if on {
		g.cur = g.comm
	} else {
		g.cur = g.stream
	}
}

// joinComm makes the communication stream wait for the work queued so far
// on the compute stream.
func (g *gpu) joinComm() error {
	after, err := cu.MakeEvent(cu.DisableTiming)
	if err != nil {
		return err
	}
	defer cu.DestroyEvent(&after) // allowed once recorded: see dtohAsync
	if err := after.Record(g.stream); err != nil {
		return err
	}
	return g.comm.Wait(after, 0)
}

// record returns an event recorded on s that a host thread can wait for
// without spinning.
func (g *gpu) record(s cu.Stream) (any, error) {
	ev, err := cu.MakeEvent(cu.DisableTiming | cu.BlockingSyncEvent)
	if err != nil {
		return nil, err
	}
	if err := ev.Record(s); err != nil {
		_ = cu.DestroyEvent(&ev)
		return nil, err
	}
	return ev, nil
}

func (g *gpu) bind() error { return cu.SetCurrentContext(g.ctx) }

func (g *gpu) await(token any) error {
	ev := token.(cu.Event)
	err := ev.Synchronize()
	if derr := cu.DestroyEvent(&ev); err == nil {
		err = derr
	}
	return err
}

func (g *gpu) mark() (any, error) {
	ev, err := cu.MakeEvent(cu.DefaultEvent)
	if err != nil {
		return nil, err
	}
	return ev, ev.Record(g.stream)
}

func (g *gpu) since(from, to any) (float64, error) {
	a, b := from.(cu.Event), to.(cu.Event)
	defer cu.DestroyEvent(&a)
	defer cu.DestroyEvent(&b)
	return a.Elapsed(b)
}

func (g *gpu) launch(name string, grid, block dim, shmem int, args []uint64) error {
	fn, err := g.function(name)
	if err != nil {
		return err
	}
	argv := make([]unsafe.Pointer, len(args))
	for i := range args {
		argv[i] = unsafe.Pointer(&args[i])
	}
	return fn.Launch(grid.x, grid.y, grid.z, block.x, block.y, block.z, shmem, g.cur, argv)
}

func (g *gpu) gemm(transA, transB bool, m, n, k int, alpha float32, A devptr, lda int, B devptr, ldb int, beta float32, C, Cin devptr, ldc int, bf16in bool) error {
	if Cin == 0 || beta == 0 {
		Cin = C
	}
	if bf16in && g.lt != nil {
		if p := g.lt.plan(transA, transB, m, n, k, lda, ldb, ldc, uint64(A), uint64(B), uint64(Cin), uint64(C)); p != nil {
			if p.tune == nil {
				t := GemmTuning{M: m, N: n, K: k, TransA: transA, TransB: transB, Accumulate: beta != 0}
				if g.noTune {
					p.tune = &t
				} else {
					g.tune(p, t, alpha, uint64(A), uint64(B), beta, uint64(C), uint64(Cin), ldc)
				}
			}
			return g.lt.run(*(*unsafe.Pointer)(unsafe.Pointer(&g.stream)), p, m, n, k, alpha, uint64(A), uint64(B), beta, uint64(C), uint64(Cin))
		}
	}
	if Cin != C { // cublasGemmEx reads and writes one C
		if ldc != m {
			return fmt.Errorf("cuda: a product adding a separate C needs ldc = m (%d, %d)", ldc, m)
		}
		if err := g.dtod(C, Cin, 4*int64(m)*int64(n)); err != nil {
			return err
		}
	}
	return g.blas.gemmEx(transA, transB, m, n, k, alpha, uint64(A), lda, uint64(B), ldb, beta, uint64(C), ldc, bf16in)
}
