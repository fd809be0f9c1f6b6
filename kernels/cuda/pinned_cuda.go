//go:build cuda && !cudaemu

package cuda

/*
#cgo LDFLAGS: -lcuda
#cgo linux CFLAGS: -I/usr/local/cuda/include
#cgo linux LDFLAGS: -L/usr/local/cuda/lib64
#include <cuda.h>

// gorgonia.org/cu frees page-locked memory but does not allocate it.
static void *bm_host_alloc(size_t bytes, CUresult *res) {
	void *p = NULL;
	*res = cuMemHostAlloc(&p, bytes, CU_MEMHOSTALLOC_PORTABLE);
	return p;
}

static const char *bm_error_name(CUresult r) {
	const char *s = NULL;
	if (cuGetErrorName(r, &s) != CUDA_SUCCESS || s == NULL) return "unknown CUresult";
	return s;
}
*/
import "C"

import (
	"fmt"
	"unsafe"
)

// memHostAlloc returns bytes of page-locked host memory, usable by every
// context (cuMemHostAlloc, CU_MEMHOSTALLOC_PORTABLE). It needs a current
// context: device thread.
func memHostAlloc(bytes int64) (unsafe.Pointer, error) {
	var res C.CUresult
	p := C.bm_host_alloc(C.size_t(bytes), &res)
	if err := cuErr("cuMemHostAlloc", res); err != nil {
		return nil, err
	}
	return p, nil
}

// cuErr is nil for CUDA_SUCCESS, else an error naming the call and the
// driver's result (ipc_cuda.go's calls too).
func cuErr(call string, r C.CUresult) error {
	if r == C.CUDA_SUCCESS {
		return nil
	}
	return fmt.Errorf("%s: %s (%d)", call, C.GoString(C.bm_error_name(r)), int(r))
}
