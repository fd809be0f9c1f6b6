//go:build cuda && !cudaemu

package cuda

/*
#cgo LDFLAGS: -lcuda
#cgo linux CFLAGS: -I/usr/local/cuda/include
#cgo linux LDFLAGS: -L/usr/local/cuda/lib64
#include <cuda.h>
#include <stdlib.h>
#include <string.h>

// gorgonia.org/cu does not wrap IPC.
static CUresult bm_ipc_alloc(CUdeviceptr *p, size_t bytes) { return cuMemAlloc(p, bytes); }
static CUresult bm_ipc_free(CUdeviceptr p) { return cuMemFree(p); }
static CUresult bm_ipc_get(void *out, CUdeviceptr p) {
	CUipcMemHandle h;
	CUresult r = cuIpcGetMemHandle(&h, p);
	if (r == CUDA_SUCCESS) memcpy(out, h.reserved, CU_IPC_HANDLE_SIZE);
	return r;
}
static CUresult bm_ipc_open(CUdeviceptr *p, const void *in) {
	CUipcMemHandle h;
	memcpy(h.reserved, in, CU_IPC_HANDLE_SIZE);
	return cuIpcOpenMemHandle(p, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
}
static CUresult bm_ipc_close(CUdeviceptr p) { return cuIpcCloseMemHandle(p); }
*/
import "C"

import (
	"fmt"
	"unsafe"
)

// A GPU's IPC (ipc.go): cuMemAlloc blocks exported with cuIpcGetMemHandle
// and opened with cuIpcOpenMemHandle (peer access enabled lazily, so a peer
// on another GPU of the host is reached over NVLink or PCIe, or staged by
// the driver where no peer access exists). Every call runs on the device
// thread, where the context is current.

const ipcKind = ipcKindGPU

// ipcPriv: the driver keeps everything a GPU mapping needs.
type ipcPriv struct{}

const ipcHandleBytes = C.CU_IPC_HANDLE_SIZE

func ipcAllocate(bytes int64) (devptr, ipcPriv, error) {
	var p C.CUdeviceptr
	if err := cuErr("cuMemAlloc", C.bm_ipc_alloc(&p, C.size_t(bytes))); err != nil {
		return 0, ipcPriv{}, err
	}
	return devptr(p), ipcPriv{}, nil
}

func ipcExport(p devptr, _ ipcPriv) ([]byte, error) {
	out := make([]byte, ipcHandleBytes)
	cbuf := C.malloc(ipcHandleBytes)
	defer C.free(cbuf)
	if err := cuErr("cuIpcGetMemHandle", C.bm_ipc_get(cbuf, C.CUdeviceptr(p))); err != nil {
		return nil, err
	}
	copy(out, unsafe.Slice((*byte)(cbuf), ipcHandleBytes))
	return out, nil
}

func ipcOpen(payload []byte, _ int64) (devptr, ipcPriv, error) {
	if len(payload) != ipcHandleBytes {
		return 0, ipcPriv{}, fmt.Errorf("GPU handle payload of %d bytes, want %d", len(payload), ipcHandleBytes)
	}
	cbuf := C.CBytes(payload)
	defer C.free(cbuf)
	var p C.CUdeviceptr
	if err := cuErr("cuIpcOpenMemHandle", C.bm_ipc_open(&p, cbuf)); err != nil {
		return 0, ipcPriv{}, err
	}
	return devptr(p), ipcPriv{}, nil
}

func ipcRelease(p devptr, _ ipcPriv, own bool) error {
	if own {
		return cuErr("cuMemFree", C.bm_ipc_free(C.CUdeviceptr(p)))
	}
	return cuErr("cuIpcCloseMemHandle", C.bm_ipc_close(C.CUdeviceptr(p)))
}
