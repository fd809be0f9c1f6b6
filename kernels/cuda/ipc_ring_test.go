//go:build cuda

package cuda

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bmojo/bmojo/allreduce"
	"github.com/bmojo/bmojo/kernels"
)

// The all-reduce ring's cuda-ipc transport (allreduce/ipc.go) on this
// backend: two rank processes on one device (one GPU, or the emulation's
// shared files), and the fallback when the handle cannot be opened. The
// transport's logic in every mix of ends is tested in allreduce with a
// fake device; here it runs on the real thing.

var _ allreduce.DeviceMem = (*Backend)(nil)

// TestMain lets the test binary double as a helper process (ipcHelperEnv).
func TestMain(m *testing.M) {
	switch os.Getenv(ipcHelperEnv) {
	case "":
		os.Exit(m.Run())
	case "open":
		if err := ipcOpenHelper(); err != nil {
			fmt.Println("ERR", err)
			os.Exit(1)
		}
	case "rank":
		if err := ipcRingRank(); err != nil {
			fmt.Println("ERR", err)
			os.Exit(1)
		}
	default:
		fmt.Println("ERR unknown helper", os.Getenv(ipcHelperEnv))
		os.Exit(2)
	}
	os.Exit(0)
}

// ipcRingLengths are the buffers each collective of the test reduces: a
// single element, lengths that leave the last chunk short, and one of many
// chunks, so the 2-slot queues wrap many times.
var ipcRingLengths = []int{1, 1000, 4099, 65537}

// ipcRingInput is rank's input of a length: seeded normal values, scaled
// per rank so that sums round.
func ipcRingInput(rank, length int) []float32 {
	rng := rand.New(rand.NewPCG(uint64(length), uint64(rank)))
	x := make([]float32, length)
	for i := range x {
		x[i] = float32(rng.NormFloat64()) * float32(1+rank)
	}
	return x
}

// ipcRingConfig is the rank's ring: small chunks and slots so that the
// buffers above pipeline. The ring works on be's communication stream, as
// a worker's does, while the test uploads and downloads on be's.
func ipcRingConfig(rank int, peers []string, be *Backend) allreduce.Config {
	c := allreduce.Default()
	c.Rank, c.Peers, c.Epoch = rank, peers, 1
	c.Transport, c.Device = allreduce.TransportCUDAIPC, be.CommBackend().(*Backend)
	c.ChunkBytes, c.ShmQueues, c.ShmSlots = 16<<10, 2, 2
	c.HopTimeout = 10 * time.Second
	return c
}

// TestIPCRingTwoProcesses: two rank processes on device 0 all-reduce
// device buffers over cuda-ipc. Both hops must report cuda-ipc, and both
// ranks' results must be bitwise identical and equal to the sum (and the
// average) computed here on the host.
func TestIPCRingTwoProcesses(t *testing.T) {
	const n = 2
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	files := make([]*os.File, n)
	addrs := make([]string, n)
	for i := range files {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addrs[i] = l.Addr().String()
		files[i], err = l.(*net.TCPListener).File()
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	type result struct {
		out string
		err error
	}
	results := make([]chan result, n)
	for i := range n {
		cmd := exec.CommandContext(ctx, exe, "-test.run=^$")
		cmd.Env = append(os.Environ(), ipcHelperEnv+"=rank", "BMOJO_IPC_RANK="+strconv.Itoa(i),
			"BMOJO_IPC_PEERS="+strings.Join(addrs, ","), "BMOJO_IPC_OUT="+filepath.Join(dir, fmt.Sprintf("rank%d.bin", i)))
		cmd.ExtraFiles = []*os.File{files[i]}
		results[i] = make(chan result, 1)
		go func() {
			out, err := cmd.CombinedOutput()
			results[i] <- result{string(out), err}
		}()
	}
	for i := range n {
		r := <-results[i]
		files[i].Close()
		if r.err != nil {
			t.Fatalf("rank %d: %v\n%s", i, r.err, r.out)
		}
		t.Logf("rank %d: %s", i, strings.TrimSpace(r.out))
		var to, from string
		for _, line := range strings.Split(r.out, "\n") {
			fmt.Sscanf(line, "TRANSPORT %s %s", &to, &from)
		}
		if to != allreduce.TransportCUDAIPC || from != allreduce.TransportCUDAIPC {
			t.Fatalf("rank %d: hops %q (to successor), %q (from predecessor); want cuda-ipc both\n%s", i, to, from, r.out)
		}
	}
	var got [n][]float32
	for i := range n {
		raw, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("rank%d.bin", i)))
		if err != nil {
			t.Fatal(err)
		}
		got[i] = make([]float32, len(raw)/4)
		for k := range got[i] {
			got[i][k] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*k:]))
		}
	}
	off := 0
	for _, kind := range []allreduce.Op{allreduce.Sum, allreduce.Avg} {
		for _, length := range ipcRingLengths {
			a, b := ipcRingInput(0, length), ipcRingInput(1, length)
			for k := range length {
				want := a[k] + b[k] // one float32 add: the only rounding a 2-rank sum has
				if kind == allreduce.Avg {
					want /= 2 // exact
				}
				for r := range n {
					if off+k >= len(got[r]) {
						t.Fatalf("rank %d wrote %d floats, want more", r, len(got[r]))
					}
					if g := got[r][off+k]; math.Float32bits(g) != math.Float32bits(want) {
						t.Fatalf("op %d length %d element %d: rank %d has %v (%#x), want %v (%#x)",
							kind, length, k, r, g, math.Float32bits(g), want, math.Float32bits(want))
					}
				}
			}
			off += length
		}
	}
	for r := range n {
		if len(got[r]) != off {
			t.Fatalf("rank %d wrote %d floats, want %d", r, len(got[r]), off)
		}
	}
}

// ipcRingRank is one rank process of TestIPCRingTwoProcesses: it serves
// on the listener at fd 3, all-reduces each length (sum, then average) on
// device buffers, appends the results to BMOJO_IPC_OUT and prints its hops.
func ipcRingRank() error {
	rank, err := strconv.Atoi(os.Getenv("BMOJO_IPC_RANK"))
	if err != nil {
		return err
	}
	peers := strings.Split(os.Getenv("BMOJO_IPC_PEERS"), ",")
	lf := os.NewFile(3, "listener")
	lis, err := net.FileListener(lf)
	if err != nil {
		return fmt.Errorf("listener from fd 3: %w", err)
	}
	lf.Close()
	d, err := Open(0, Options{})
	if err != nil {
		return err
	}
	defer d.Close()
	be := d.NewBackend()
	ring, err := allreduce.New(ipcRingConfig(rank, peers, be), lis)
	if err != nil {
		return err
	}
	defer ring.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	if err := ring.Connect(ctx); err != nil {
		return err
	}
	out := bufio.NewWriter(nil)
	f, err := os.Create(os.Getenv("BMOJO_IPC_OUT"))
	if err != nil {
		return err
	}
	defer f.Close()
	out.Reset(f)
	for _, kind := range []allreduce.Op{allreduce.Sum, allreduce.Avg} {
		for _, length := range ipcRingLengths {
			buf := be.Alloc(length)
			be.Upload(buf, ipcRingInput(rank, length))
			if err := ring.AllReduceDevice(ctx, buf, kind); err != nil {
				return err
			}
			res := make([]float32, length)
			be.Download(res, buf)
			for _, v := range res {
				_ = binary.Write(out, binary.LittleEndian, math.Float32bits(v))
			}
		}
	}
	if err := out.Flush(); err != nil {
		return err
	}
	to, from := ring.Transport()
	fmt.Printf("TRANSPORT %s %s\n", to, from)
	if err := be.Err(); err != nil {
		return err
	}
	// Leave together: a rank that closes while the other still sends
	// would look like a failure to it. (On the device: a host collective
	// between processes hands Go memory over through shared memory, which
	// the race detector cannot follow; see allreduce/shm_race.go.)
	return ring.AllReduceDevice(ctx, be.Alloc(1), allreduce.Sum)
}

// TestIPCRingOneProcess: two ranks in one process cannot map each other's
// device slots (CUDA opens a handle only in another process), so the hops
// fall back to host shared memory; device collectives still give the sum.
func TestIPCRingOneProcess(t *testing.T) {
	d := openDevice(t, "bf16")
	const n = 2
	var lis [n]net.Listener
	peers := make([]string, n)
	for i := range lis {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lis[i], peers[i] = l, l.Addr().String()
	}
	var rings [n]*allreduce.Ring
	var bes [n]*Backend
	for i := range rings {
		bes[i] = d.NewBackend()
		r, err := allreduce.New(ipcRingConfig(i, peers, bes[i]), lis[i])
		if err != nil {
			t.Fatal(err)
		}
		rings[i] = r
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	errs := make(chan error, n)
	for i := range rings {
		go func() { errs <- rings[i].Connect(ctx) }()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	defer func() {
		for i := range rings {
			go func() { errs <- rings[i].Close() }()
		}
		for range n {
			<-errs
		}
	}()
	for i, r := range rings {
		if to, from := r.Transport(); to != allreduce.TransportShm || from != allreduce.TransportShm {
			t.Fatalf("rank %d: hops %q, %q; want the shm fallback", i, to, from)
		}
	}
	const length = 9001
	var bufs [n]kernels.Buffer
	for i := range bufs {
		bufs[i] = bes[i].Alloc(length)
		bes[i].Upload(bufs[i], ipcRingInput(i, length))
	}
	for i := range rings {
		go func() { errs <- rings[i].AllReduceDevice(ctx, bufs[i], allreduce.Sum) }()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	a, b := ipcRingInput(0, length), ipcRingInput(1, length)
	for i := range bufs {
		got := make([]float32, length)
		bes[i].Download(got, bufs[i])
		for k := range got {
			if want := a[k] + b[k]; math.Float32bits(got[k]) != math.Float32bits(want) {
				t.Fatalf("rank %d element %d = %v, want %v", i, k, got[k], want)
			}
		}
	}
}
