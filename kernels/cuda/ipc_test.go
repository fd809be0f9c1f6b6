//go:build cuda

package cuda

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// ipcHelperEnv makes the test binary a helper process (TestMain in
// ipc_ring_test.go): "open" runs ipcOpenHelper, "rank" ipcRingRank.
const ipcHelperEnv = "BMOJO_CUDA_IPC_HELPER"

// runHelper starts this test binary as a helper process with env added and
// returns its combined output; the test fails if it fails.
func runHelper(t *testing.T, env ...string) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper process %v: %v\n%s", env, err, out)
	}
	return string(out)
}

// TestIPCBadHandles: every malformed or foreign handle fails OpenIPC with
// an error wrapping ErrIPC that says what is wrong, never a panic; so do
// exports of buffers that are not IPC allocations.
func TestIPCBadHandles(t *testing.T) {
	d := openDevice(t, "bf16")
	be := d.NewBackend()
	buf, err := be.AllocIPC(1024)
	if err != nil {
		t.Fatal(err)
	}
	defer be.CloseIPC(buf)
	h, err := be.ExportIPC(buf)
	if err != nil {
		t.Fatal(err)
	}
	mod := func(f func(h []byte) []byte) []byte { return f(bytes.Clone(h)) }
	le := binary.LittleEndian
	other := map[uint32]uint32{ipcKindGPU: ipcKindEmu, ipcKindEmu: ipcKindGPU}[ipcKind]
	cases := []struct {
		name   string
		handle []byte
		n      int
		want   string
	}{
		{"nil", nil, 4, "shorter than"},
		{"short", h[:ipcHdr-1], 4, "shorter than"},
		{"magic", mod(func(h []byte) []byte { h[0] = 'X'; return h }), 4, "not a bmojo IPC handle"},
		{"version", mod(func(h []byte) []byte { le.PutUint32(h[8:], ipcVersion+1); return h }), 4, "version"},
		{"other build", mod(func(h []byte) []byte { le.PutUint32(h[12:], other); return h }), 4, "handle made by"},
		{"too small", h, 1025, "holds 4096 bytes"},
		{"zero floats", h, 0, "at least 1"},
		{"own process", h, 4, "exported by this process"},
		{"truncated payload", mod(func(h []byte) []byte { le.PutUint32(h[24:], 1); return h[:ipcHdr+3] }), 4, ""},
		{"garbage payload", mod(func(h []byte) []byte {
			le.PutUint32(h[24:], 1)
			for i := ipcHdr; i < len(h); i++ {
				h[i] ^= 0x5a
			}
			return h
		}), 4, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := be.OpenIPC(tc.handle, tc.n)
			if err == nil {
				be.CloseIPC(got)
				t.Fatal("OpenIPC succeeded")
			}
			if !errors.Is(err, ErrIPC) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("OpenIPC: %v; want ErrIPC saying %q", err, tc.want)
			}
		})
	}
	if _, err := be.ExportIPC(be.Alloc(16)); !errors.Is(err, ErrIPC) {
		t.Errorf("ExportIPC of a cached buffer: %v, want ErrIPC", err)
	}
	if _, err := be.ExportIPC(be.Slice(buf, 1, 8)); !errors.Is(err, ErrIPC) {
		t.Errorf("ExportIPC of a view: %v, want ErrIPC", err)
	}
	if _, err := be.AllocIPC(0); err == nil {
		t.Error("AllocIPC(0) succeeded")
	}
	if err := be.Err(); err != nil {
		t.Fatalf("the backend recorded an error for IPC misuse: %v", err)
	}
}

// TestIPCBufferOps: an IPC allocation is a buffer like any other for the
// ops the ring runs on it (upload, views, copy, accumulate, scale, lazy
// zero, download), and CloseIPC frees it once.
func TestIPCBufferOps(t *testing.T) {
	d := openDevice(t, "bf16")
	be := d.NewBackend()
	const n = 1000
	buf, err := be.AllocIPC(n)
	if err != nil {
		t.Fatal(err)
	}
	x := make([]float32, n)
	for i := range x {
		x[i] = float32(i) * 0.5
	}
	be.Upload(buf, x)
	src := be.Alloc(300)
	ones := make([]float32, 300)
	for i := range ones {
		ones[i] = 1
	}
	be.Upload(src, ones)
	be.Accumulate(be.Slice(buf, 100, 300), src) // [100,400) += 1
	be.Scale(be.Slice(buf, 400, 100), 2)        // [400,500) *= 2
	be.Copy(be.Slice(buf, 500, 300), src)       // [500,800) = 1
	be.Zero(be.Slice(buf, 800, 200))            // [800,1000) = 0
	be.Accumulate(be.Slice(buf, 800, 100), be.Slice(src, 0, 100))
	if err := be.Fence(); err != nil {
		t.Fatal(err)
	}
	got := make([]float32, n)
	be.Download(got, buf)
	for i, v := range got {
		want := x[i]
		switch {
		case i >= 100 && i < 400:
			want += 1
		case i >= 400 && i < 500:
			want *= 2
		case i >= 500 && i < 800:
			want = 1
		case i >= 800 && i < 900:
			want = 1
		case i >= 900:
			want = 0
		}
		if v != want {
			t.Fatalf("element %d = %v, want %v", i, v, want)
		}
	}
	if err := be.Err(); err != nil {
		t.Fatal(err)
	}
	if err := be.CloseIPC(buf); err != nil {
		t.Fatal(err)
	}
	if err := be.CloseIPC(buf); !errors.Is(err, ErrIPC) {
		t.Fatalf("second CloseIPC: %v, want ErrIPC", err)
	}
}

// TestIPCTwoProcesses: another process opens an exported allocation, reads
// what this one wrote, adds its own buffer into it on its device and
// copies a buffer device to device into a second range; this one then
// reads the sums. CUDA IPC on a GPU, a shared file in the emulation.
func TestIPCTwoProcesses(t *testing.T) {
	d := openDevice(t, "bf16")
	be := d.NewBackend()
	const n = 5000
	buf, err := be.AllocIPC(2 * n)
	if err != nil {
		t.Fatal(err)
	}
	defer be.CloseIPC(buf)
	x := make([]float32, 2*n)
	for i := range x {
		x[i] = float32(i) * 0.5
	}
	be.Upload(buf, x)
	if err := be.Fence(); err != nil {
		t.Fatal(err)
	}
	h, err := be.ExportIPC(buf)
	if err != nil {
		t.Fatal(err)
	}
	out := runHelper(t, ipcHelperEnv+"=open", "BMOJO_IPC_HANDLE="+hex.EncodeToString(h), fmt.Sprintf("BMOJO_IPC_N=%d", n))
	t.Logf("helper: %s", strings.TrimSpace(out))
	got := make([]float32, 2*n)
	be.Download(got, buf)
	for i, v := range got {
		want := x[i] + float32(i%n+1) // [0,n): accumulated; [n,2n): copied
		if i >= n {
			want = float32(i%n + 1)
		}
		if v != want {
			t.Fatalf("element %d = %v after the other process wrote it, want %v", i, v, want)
		}
	}
}

// ipcOpenHelper is TestIPCTwoProcesses's other process.
func ipcOpenHelper() error {
	h, err := hex.DecodeString(os.Getenv("BMOJO_IPC_HANDLE"))
	if err != nil {
		return err
	}
	var n int
	if _, err := fmt.Sscan(os.Getenv("BMOJO_IPC_N"), &n); err != nil {
		return err
	}
	d, err := Open(0, Options{})
	if err != nil {
		return err
	}
	defer d.Close()
	be := d.NewBackend()
	peer, err := be.OpenIPC(h, 2*n)
	if err != nil {
		return err
	}
	seen := make([]float32, 2*n)
	be.Download(seen, peer)
	for i, v := range seen {
		if v != float32(i)*0.5 {
			return fmt.Errorf("element %d of the peer's allocation reads %v, want %v", i, v, float32(i)*0.5)
		}
	}
	mine := make([]float32, n)
	for i := range mine {
		mine[i] = float32(i + 1)
	}
	own := be.Alloc(n)
	be.Upload(own, mine)
	be.Accumulate(be.Slice(peer, 0, n), own)
	be.Copy(be.Slice(peer, n, n), own)
	if err := be.Fence(); err != nil {
		return err
	}
	if err := be.CloseIPC(peer); err != nil {
		return err
	}
	fmt.Println("opened, checked and wrote", 2*n, "floats")
	return be.Err()
}
