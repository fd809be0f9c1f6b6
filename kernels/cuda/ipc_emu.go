//go:build cuda && cudaemu

package cuda

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The emulation's IPC (ipc.go): device memory is host memory, so an
// exportable allocation is a file in /dev/shm mapped MAP_SHARED; the handle
// is its path and a random nonce that the file's first page repeats. The
// importer unlinks the file once it has mapped it (as the same-host path
// of allreduce does), so after a successful open the memory has no name and
// goes with the last mapping; a file nobody opened is removed by CloseIPC
// (a process killed before either leaves it behind, named with its pid).

const ipcKind = ipcKindEmu

const (
	ipcEmuPrefix = "bmojo-ipc-"
	ipcEmuPage   = 4096 // the file's header page: magic, nonce, bytes
	ipcEmuMagic  = "BMIPCEMU"
)

// ipcPriv is a mapping's file: the whole mapping and the name while it has one.
type ipcPriv struct {
	mem   []byte
	path  string
	nonce uint64
}

func ipcEmuDir() string {
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		return "/dev/shm"
	}
	return os.TempDir()
}

func ipcAllocate(bytes int64) (devptr, ipcPriv, error) {
	var rnd [16]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return 0, ipcPriv{}, err
	}
	path := filepath.Join(ipcEmuDir(), fmt.Sprintf("%s%d-%s", ipcEmuPrefix, os.Getpid(), hex.EncodeToString(rnd[:8])))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return 0, ipcPriv{}, err
	}
	defer f.Close()
	size := ipcEmuPage + bytes
	if err := f.Truncate(size); err != nil {
		_ = os.Remove(path)
		return 0, ipcPriv{}, err
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		_ = os.Remove(path)
		return 0, ipcPriv{}, fmt.Errorf("map %s: %w", path, err)
	}
	nonce := binary.LittleEndian.Uint64(rnd[8:])
	copy(mem, ipcEmuMagic)
	binary.LittleEndian.PutUint64(mem[8:], nonce)
	binary.LittleEndian.PutUint64(mem[16:], uint64(bytes))
	return devptr(uintptr(unsafe.Pointer(&mem[ipcEmuPage]))), ipcPriv{mem: mem, path: path, nonce: nonce}, nil
}

func ipcExport(_ devptr, priv ipcPriv) ([]byte, error) {
	if priv.path == "" {
		return nil, fmt.Errorf("the allocation's file is gone: a peer opened it already")
	}
	out := make([]byte, 8, 8+len(priv.path))
	binary.LittleEndian.PutUint64(out, priv.nonce)
	return append(out, priv.path...), nil
}

func ipcOpen(payload []byte, bytes int64) (devptr, ipcPriv, error) {
	if len(payload) < 9 {
		return 0, ipcPriv{}, fmt.Errorf("emulated handle payload of %d bytes: too short", len(payload))
	}
	nonce := binary.LittleEndian.Uint64(payload)
	path := string(payload[8:])
	dir, base := filepath.Dir(path), filepath.Base(path)
	if !strings.HasPrefix(base, ipcEmuPrefix) || (dir != "/dev/shm" && dir != filepath.Clean(os.TempDir())) {
		return 0, ipcPriv{}, fmt.Errorf("path %q is not an emulated IPC allocation", path)
	}
	path = filepath.Join(dir, base)
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_NOFOLLOW, 0)
	if err != nil {
		return 0, ipcPriv{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, ipcPriv{}, err
	}
	if !st.Mode().IsRegular() || st.Size() != ipcEmuPage+bytes {
		return 0, ipcPriv{}, fmt.Errorf("%s: %d bytes, want %d", path, st.Size(), ipcEmuPage+bytes)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return 0, ipcPriv{}, fmt.Errorf("map %s: %w", path, err)
	}
	if string(mem[:8]) != ipcEmuMagic || binary.LittleEndian.Uint64(mem[8:]) != nonce || int64(binary.LittleEndian.Uint64(mem[16:])) != bytes {
		_ = unix.Munmap(mem)
		return 0, ipcPriv{}, fmt.Errorf("%s: not the allocation the handle names (nonce or size differ)", path)
	}
	_ = os.Remove(path) // both ends have it mapped: nothing needs the name
	return devptr(uintptr(unsafe.Pointer(&mem[ipcEmuPage]))), ipcPriv{mem: mem}, nil
}

func ipcRelease(_ devptr, priv ipcPriv, _ bool) error {
	if priv.path != "" {
		_ = os.Remove(priv.path) // never opened; gone already otherwise
	}
	return unix.Munmap(priv.mem)
}
