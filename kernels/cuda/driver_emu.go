//go:build cuda && cudaemu

package cuda

/*
#cgo CXXFLAGS: -std=c++17 -O2 -Wno-unknown-pragmas -Wno-unused-variable -Wno-unused-function -Wno-unused-but-set-variable
#include <stdlib.h>
#include <string.h>
int bm_emu_launch(const char *name, int gx, int gy, int gz, int bx, int by, int bz, int shmem,
                  unsigned long long *args, int nargs, char *err, int errlen);
*/
import "C"

import (
	"errors"
	"math"
	"time"
	"unsafe"

	"github.com/bmojo/bmojo/kernels"
)

// Built reports whether this binary contains the CUDA backend (here its
// CPU emulation).
const Built = true

// Emulated reports whether the backend is the CPU emulation (cudaemu).
const Emulated = true

// emu is the driver of the cudaemu build: device memory is host memory and
// the kernels of csrc/*.cu, compiled for the host, run block by block with
// every thread a fiber (emu/emu.h). It checks kernels and their launch code
// on machines without a GPU; it is slow and never used for training.
type emu struct {
	held  int64
	sizes map[devptr]int64 // live blocks (held counts them)
	bf16  bool
}

func newDriver() driver { return &emu{} }

func (e *emu) start(ordinal int, opt Options) (Info, error) {
	if ordinal != 0 {
		return Info{}, errors.New("cuda: the emulator has one device, 0")
	}
	e.bf16 = opt.MatMul == "bf16"
	return Info{Name: "CPU emulation (cudaemu)", MemTotal: 8 << 30, SMs: 2, ComputeMajor: 9, CuBLAS: "emulated", UUID: emuUUID}, nil
}

// emuUUID names the emulated device.
const emuUUID = "GPU-00000000-0000-0000-0000-00000000e0e0"

// Visible returns the emulator's one device.
func Visible() ([]string, error) { return []string{emuUUID}, nil }

func (e *emu) stop() {}

// useComm and joinComm: the emulation runs every op when it is queued, so
// its streams are one.
func (e *emu) useComm(bool)    {}
func (e *emu) joinComm() error { return nil }

func (e *emu) malloc(bytes int64) (devptr, error) {
	if e.held+bytes > 8<<30 {
		return 0, errors.New("CUDA_ERROR_OUT_OF_MEMORY (emulated 8 GiB device)")
	}
	p := C.calloc(1, C.size_t(bytes))
	if p == nil {
		return 0, errors.New("CUDA_ERROR_OUT_OF_MEMORY (host calloc failed)")
	}
	e.held += bytes
	if e.sizes == nil {
		e.sizes = map[devptr]int64{}
	}
	e.sizes[devptr(uintptr(p))] = bytes
	return devptr(uintptr(p)), nil
}

func (e *emu) free(p devptr) error {
	C.free(ptrOf(p))
	e.held -= e.sizes[p]
	delete(e.sizes, p)
	return nil
}

func (e *emu) memInfo() (free, total int64) { return 8<<30 - e.held, 8 << 30 }

// ptrOf turns an emulated device address (C memory) into a pointer.
func ptrOf(p devptr) unsafe.Pointer { return unsafe.Add(unsafe.Pointer(nil), uintptr(p)) }

func (e *emu) memset32(p devptr, n int64) error {
	C.memset(ptrOf(p), 0, C.size_t(4*n))
	return nil
}

func (e *emu) fill32(p devptr, n int64, v uint32) error {
	w := unsafe.Slice((*uint32)(ptrOf(p)), n)
	for i := range w {
		w[i] = v
	}
	return nil
}

func (e *emu) htod(dst devptr, src unsafe.Pointer, bytes int64) error {
	C.memcpy(ptrOf(dst), src, C.size_t(bytes))
	return nil
}

func (e *emu) dtoh(dst unsafe.Pointer, src devptr, bytes int64) error {
	C.memcpy(dst, ptrOf(src), C.size_t(bytes))
	return nil
}

func (e *emu) dtod(dst, src devptr, bytes int64) error {
	C.memmove(ptrOf(dst), ptrOf(src), C.size_t(bytes))
	return nil
}

func (e *emu) sync() error { return nil }

func (e *emu) hostAlloc(bytes int64) (unsafe.Pointer, error) {
	p := C.malloc(C.size_t(bytes))
	if p == nil {
		return nil, errors.New("CUDA_ERROR_OUT_OF_MEMORY (host malloc failed)")
	}
	return p, nil
}

func (e *emu) hostFree(p unsafe.Pointer) error {
	C.free(p)
	return nil
}

// dtohAsync defers the copy to await, on the waiter thread, while the
// device thread runs the kernels queued after it: as on a GPU, a later op
// that wrote src (which kernels.AsyncCopier forbids) would show up in the
// copy, and the copy runs beside kernels.
func (e *emu) dtohAsync(dst unsafe.Pointer, src devptr, bytes int64) (any, error) {
	return func() { C.memcpy(dst, ptrOf(src), C.size_t(bytes)) }, nil
}

// fence is nothing to wait for: kernels run when they are queued.
func (e *emu) fence() (any, error) { return nil, nil }

func (e *emu) bind() error { return nil }

func (e *emu) await(token any) error {
	if f, ok := token.(func()); ok {
		f()
	}
	return nil
}

func (e *emu) tunings() []GemmTuning { return nil }

// The emulation runs kernels at launch: a mark is the host clock.
func (e *emu) mark() (any, error) { return time.Now(), nil }

func (e *emu) since(from, to any) (float64, error) {
	return float64(to.(time.Time).Sub(from.(time.Time))) / 1e6, nil
}

func (e *emu) launch(name string, grid, block dim, shmem int, args []uint64) error {
	cn := C.CString(name)
	defer C.free(unsafe.Pointer(cn))
	var msg [512]C.char
	var argp *C.ulonglong
	if len(args) > 0 {
		argp = (*C.ulonglong)(unsafe.Pointer(&args[0]))
	}
	if C.bm_emu_launch(cn, C.int(grid.x), C.int(grid.y), C.int(grid.z), C.int(block.x), C.int(block.y), C.int(block.z),
		C.int(shmem), argp, C.int(len(args)), &msg[0], C.int(len(msg))) != 0 {
		return errors.New(C.GoString(&msg[0]))
	}
	return nil
}

// gemm is cuBLAS's column-major product in plain loops: float32 inputs
// (rounded to bf16 when the device computes in bf16) or bfloat16 inputs
// (bf16in), float32 sums.
func (e *emu) gemm(transA, transB bool, m, n, k int, alpha float32, A devptr, lda int, B devptr, ldb int, beta float32, Cp, Cin devptr, ldc int, bf16in bool) error {
	if Cin == 0 {
		Cin = Cp
	}
	at := func(p devptr, ld, rows int) func(i int) float32 {
		if bf16in {
			h := unsafe.Slice((*uint16)(ptrOf(p)), ld*rows)
			return func(i int) float32 { return math.Float32frombits(uint32(h[i]) << 16) }
		}
		f := unsafe.Slice((*float32)(ptrOf(p)), ld*rows)
		if e.bf16 {
			return func(i int) float32 { return kernels.RoundBF16(f[i]) }
		}
		return func(i int) float32 { return f[i] }
	}
	a, b := at(A, lda, max(m, k)), at(B, ldb, max(n, k))
	c := unsafe.Slice((*float32)(ptrOf(Cp)), ldc*n)
	cin := unsafe.Slice((*float32)(ptrOf(Cin)), ldc*n)
	for j := 0; j < n; j++ {
		for i := 0; i < m; i++ {
			var s float32
			for l := 0; l < k; l++ {
				ia, ib := i+l*lda, l+j*ldb
				if transA {
					ia = l + i*lda
				}
				if transB {
					ib = j + l*ldb
				}
				s += a(ia) * b(ib)
			}
			if beta == 0 {
				c[i+j*ldc] = alpha * s
			} else {
				c[i+j*ldc] = alpha*s + beta*cin[i+j*ldc]
			}
		}
	}
	return nil
}
