//go:build cuda && !cudaemu

package cuda

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdlib.h>

// cuBLAS is loaded at run time (dlopen) so one binary works with the CUDA
// 11, 12 and 13 installs; the few entry points are declared here instead of
// including cublas_v2.h.
typedef int (*bm_create_t)(void **);
typedef int (*bm_destroy_t)(void *);
typedef int (*bm_set_stream_t)(void *, void *);
typedef int (*bm_set_math_t)(void *, int);
typedef int (*bm_set_workspace_t)(void *, void *, size_t);
typedef int (*bm_gemm_ex_t)(void *, int, int, int, int, int, const void *,
	const void *, int, int, const void *, int, int, const void *,
	void *, int, int, int, int);

static int bm_create(void *f, void **h) { return ((bm_create_t)f)(h); }
static int bm_destroy(void *f, void *h) { return ((bm_destroy_t)f)(h); }
static int bm_set_stream(void *f, void *h, void *s) { return ((bm_set_stream_t)f)(h, s); }
static int bm_set_math(void *f, void *h, int m) { return ((bm_set_math_t)f)(h, m); }
static int bm_gemm(void *f, void *h, int ta, int tb, int m, int n, int k,
	float alpha, unsigned long long A, int lda, unsigned long long B, int ldb, float beta,
	unsigned long long C, int ldc, int abType, int compute) {
	// C is CUDA_R_32F (0); A and B are abType; algorithm CUBLAS_GEMM_DEFAULT = -1.
	return ((bm_gemm_ex_t)f)(h, ta, tb, m, n, k, &alpha, (const void *)A, abType, lda,
		(const void *)B, abType, ldb, &beta, (void *)C, 0, ldc, compute, -1);
}
static int bm_set_workspace(void *f, void *h, unsigned long long w, size_t bytes) {
	return ((bm_set_workspace_t)f)(h, (void *)w, bytes);
}
*/
import "C"

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"unsafe"
)

// cuBLAS enum values (cublas_api.h; stable across CUDA 11–13).
const (
	cudaR32F              = 0  // cudaDataType CUDA_R_32F
	cudaR16BF             = 14 // CUDA_R_16BF
	cublasOpN             = 0
	cublasOpT             = 1
	cublasCompute32F      = 68 // CUBLAS_COMPUTE_32F
	cublasCompute32FFast  = 75 // CUBLAS_COMPUTE_32F_FAST_16BF: bf16 tensor cores, fp32 accumulation
	cublasDefaultMath     = 0
	cublasPedanticMath    = 2 // CUBLAS_PEDANTIC_MATH: no reduced-precision shortcuts
	cublasTF32TensorMath  = 3
	cublasStatusSuccess   = 0
	cublasNotInitialized  = 1
	cublasArchMismatch    = 8
	cublasExecutionFailed = 13
)

// cublasNames are the sonames tried in order (CUDA 13, 12, 11), then the
// usual install directories.
var cublasNames = []string{
	"libcublas.so.13", "libcublas.so.12", "libcublas.so.11",
	"/usr/local/cuda/lib64/libcublas.so.13", "/usr/local/cuda/lib64/libcublas.so.12",
	"/usr/local/cuda-13.0/lib64/libcublas.so.13", "/usr/local/cuda-12/lib64/libcublas.so.12",
	"/usr/lib/x86_64-linux-gnu/libcublas.so.11",
}

type cublas struct {
	lib     string
	dl      unsafe.Pointer
	handle  unsafe.Pointer
	gemm    unsafe.Pointer
	destroy unsafe.Pointer
	setWS   unsafe.Pointer
	compute C.int
}

// loadCublas opens cuBLAS (BMOJO_CUBLAS names a library to use instead),
// creates a handle bound to stream and picks the compute type.
func loadCublas(stream unsafe.Pointer, bf16 bool) (*cublas, error) {
	names := cublasNames
	if p := os.Getenv("BMOJO_CUBLAS"); p != "" {
		names = []string{p}
	}
	b := &cublas{}
	var err error
	if b.dl, b.lib, err = dlopenFirst(names); err != nil {
		return nil, fmt.Errorf("cuda: cuBLAS not found (set BMOJO_CUBLAS to its path): %w", err)
	}
	sym := func(name string) (unsafe.Pointer, error) { return dlsym(b.dl, b.lib, name) }
	create, err := sym("cublasCreate_v2")
	if err != nil {
		return nil, err
	}
	if b.destroy, err = sym("cublasDestroy_v2"); err != nil {
		return nil, err
	}
	setStream, err := sym("cublasSetStream_v2")
	if err != nil {
		return nil, err
	}
	setMath, err := sym("cublasSetMathMode")
	if err != nil {
		return nil, err
	}
	if b.gemm, err = sym("cublasGemmEx"); err != nil {
		return nil, err
	}
	if b.setWS, err = sym("cublasSetWorkspace_v2"); err != nil {
		return nil, err
	}
	if st := C.bm_create(create, &b.handle); st != cublasStatusSuccess {
		return nil, fmt.Errorf("cuda: cublasCreate: status %d", int(st))
	}
	if st := C.bm_set_stream(setStream, b.handle, stream); st != cublasStatusSuccess {
		return nil, fmt.Errorf("cuda: cublasSetStream: status %d", int(st))
	}
	math := C.int(cublasPedanticMath)
	b.compute = cublasCompute32F
	if bf16 {
		math, b.compute = cublasDefaultMath, cublasCompute32FFast
	}
	if st := C.bm_set_math(setMath, b.handle, math); st != cublasStatusSuccess {
		return nil, fmt.Errorf("cuda: cublasSetMathMode: status %d", int(st))
	}
	return b, nil
}

// dlopenFirst opens the first library of names that loads; the error
// lists why each failed.
func dlopenFirst(names []string) (unsafe.Pointer, string, error) {
	var tried []string
	for _, n := range names {
		cn := C.CString(n)
		h := C.dlopen(cn, C.RTLD_NOW|C.RTLD_LOCAL)
		C.free(unsafe.Pointer(cn))
		if h != nil {
			return h, n, nil
		}
		tried = append(tried, C.GoString(C.dlerror()))
	}
	return nil, "", errors.New(strings.Join(tried, "; "))
}

// dlsym returns symbol name of the library lib opened as dl.
func dlsym(dl unsafe.Pointer, lib, name string) (unsafe.Pointer, error) {
	cn := C.CString(name)
	defer C.free(unsafe.Pointer(cn))
	p := C.dlsym(dl, cn)
	if p == nil {
		return nil, fmt.Errorf("cuda: %s has no %s", lib, name)
	}
	return p, nil
}

func (b *cublas) close() {
	if b != nil && b.handle != nil {
		C.bm_destroy(b.destroy, b.handle)
		b.handle = nil
	}
}

// setWorkspace gives cuBLAS a workspace of its own (Hopper's fastest
// kernels need more than the default). Device thread only.
func (b *cublas) setWorkspace(p uint64, bytes int64) error {
	if st := C.bm_set_workspace(b.setWS, b.handle, C.ulonglong(p), C.size_t(bytes)); st != cublasStatusSuccess {
		return fmt.Errorf("cuda: cublasSetWorkspace: status %d", int(st))
	}
	return nil
}

// gemm computes C = alpha·op(A)·op(B) + beta·C in cuBLAS's column-major
// convention: A and B float32 computed at the handle's precision, or
// bfloat16 (bf16in) on tensor cores with fp32 accumulation; C float32.
// Device thread only.
func (b *cublas) gemmEx(transA, transB bool, m, n, k int, alpha float32, A uint64, lda int, B uint64, ldb int, beta float32, Cp uint64, ldc int, bf16in bool) error {
	abType, compute := C.int(cudaR32F), b.compute
	if bf16in {
		abType, compute = cudaR16BF, cublasCompute32F
	}
	ta, tb := C.int(cublasOpN), C.int(cublasOpN)
	if transA {
		ta = cublasOpT
	}
	if transB {
		tb = cublasOpT
	}
	st := C.bm_gemm(b.gemm, b.handle, ta, tb, C.int(m), C.int(n), C.int(k), C.float(alpha),
		C.ulonglong(A), C.int(lda), C.ulonglong(B), C.int(ldb), C.float(beta),
		C.ulonglong(Cp), C.int(ldc), abType, compute)
	if st != cublasStatusSuccess {
		return fmt.Errorf("cublasGemmEx(m=%d n=%d k=%d): status %d", m, n, k, int(st))
	}
	return nil
}
