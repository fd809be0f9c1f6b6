package allreduce

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bmojo/bmojo/kernels"
	pb "github.com/bmojo/bmojo/proto/allreducepb"
)

// The cuda-ipc transport's logic (ipc.go) against fakeDevice, a DeviceMem
// in Go memory whose handles any ring of this process can open: the
// negotiation, the device slots, every mix of device and host ends, and the
// fallbacks, with no GPU and no build tags. The real backend (kernels/cuda,
// also its CPU emulation) is tested across two processes in
// kernels/cuda/ipc_ring_test.go.

// fakeDevice is DeviceMem in host memory. Handles are "FAKE" and an id;
// refuse makes OpenIPC fail as CUDA does in the exporting process.
type fakeDevice struct {
	refuse bool
	mu     sync.Mutex
	fences int
}

type fakeBuf struct {
	f   []float32
	id  uint64 // an IPC allocation's or mapping's, 0 for views
	own bool
}

func (b *fakeBuf) Len() int { return len(b.f) }

var fakeIPC = struct {
	sync.Mutex
	next uint64
	live map[uint64][]float32
}{live: map[uint64][]float32{}}

func (d *fakeDevice) AllocIPC(n int) (kernels.Buffer, error) {
	if n <= 0 {
		return nil, fmt.Errorf("fake: AllocIPC(%d)", n)
	}
	fakeIPC.Lock()
	defer fakeIPC.Unlock()
	fakeIPC.next++
	f := make([]float32, n)
	for i := range f {
		f[i] = float32(math.NaN()) // undefined until written
	}
	fakeIPC.live[fakeIPC.next] = f
	return &fakeBuf{f: f, id: fakeIPC.next, own: true}, nil
}

func (d *fakeDevice) ExportIPC(buf kernels.Buffer) ([]byte, error) {
	b, ok := buf.(*fakeBuf)
	if !ok || !b.own {
		return nil, errors.New("fake: not an IPC allocation")
	}
	return binary.LittleEndian.AppendUint64([]byte("FAKE"), b.id), nil
}

func (d *fakeDevice) OpenIPC(h []byte, n int) (kernels.Buffer, error) {
	if d.refuse {
		return nil, errors.New("fake: refused (as CUDA refuses in the exporting process)")
	}
	if len(h) != 12 || string(h[:4]) != "FAKE" {
		return nil, fmt.Errorf("fake: bad handle %q", h)
	}
	fakeIPC.Lock()
	defer fakeIPC.Unlock()
	f, ok := fakeIPC.live[binary.LittleEndian.Uint64(h[4:])]
	if !ok || n > len(f) {
		return nil, fmt.Errorf("fake: no allocation of %d floats behind the handle", n)
	}
	return &fakeBuf{f: f[:n], id: binary.LittleEndian.Uint64(h[4:])}, nil
}

func (d *fakeDevice) CloseIPC(buf kernels.Buffer) error {
	b, ok := buf.(*fakeBuf)
	if !ok || b.id == 0 {
		return errors.New("fake: not an IPC buffer")
	}
	if b.own {
		fakeIPC.Lock()
		delete(fakeIPC.live, b.id)
		fakeIPC.Unlock()
	}
	return nil
}

func (d *fakeDevice) Slice(x kernels.Buffer, off, n int) kernels.Buffer {
	return &fakeBuf{f: x.(*fakeBuf).f[off : off+n]}
}

func (d *fakeDevice) Copy(dst, src kernels.Buffer) { copy(dst.(*fakeBuf).f, src.(*fakeBuf).f) }

func (d *fakeDevice) Accumulate(dst, src kernels.Buffer) {
	s := src.(*fakeBuf).f
	for i := range dst.(*fakeBuf).f {
		dst.(*fakeBuf).f[i] += s[i]
	}
}

func (d *fakeDevice) Scale(x kernels.Buffer, s float64) {
	for i, v := range x.(*fakeBuf).f {
		x.(*fakeBuf).f[i] = float32(float64(v) * s) // bm_scale's rounding
	}
}

func (d *fakeDevice) Upload(dst kernels.Buffer, src []float32)   { copy(dst.(*fakeBuf).f, src) }
func (d *fakeDevice) Download(dst []float32, src kernels.Buffer) { copy(dst, src.(*fakeBuf).f) }

func (d *fakeDevice) Join() {}

func (d *fakeDevice) Fence() error {
	d.mu.Lock()
	d.fences++
	d.mu.Unlock()
	return nil
}

var _ DeviceMem = (*fakeDevice)(nil)

// newIPCRings is newRings without its transport check (which knows the
// host paths only); mod sets each rank's config.
func newIPCRings(t *testing.T, n int, mod func(rank int, c *Config)) []*Ring {
	t.Helper()
	lis, addrs := listeners(t, n)
	rings := make([]*Ring, n)
	for i := range rings {
		c := testConfig()
		c.Rank, c.Peers, c.Epoch, c.Logger = i, addrs, 5, testLogger(t)
		mod(i, &c)
		r, err := New(c, lis[i])
		if err != nil {
			t.Fatal(err)
		}
		rings[i] = r
	}
	t.Cleanup(func() { parallel(len(rings), func(i int) error { return rings[i].Close() }) })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i, err := range parallel(n, func(i int) error { return rings[i].Connect(ctx) }) {
		if err != nil {
			t.Fatalf("rank %d connect: %v", i, err)
		}
	}
	return rings
}

// waitTransports polls until every rank reports the wanted hops: a
// predecessor's hop turns cuda-ipc when the predecessor has opened the
// slots, which may come after our own Connect returned.
func waitTransports(t *testing.T, rings []*Ring, want func(rank int) (out, in string)) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for i, r := range rings {
		wo, wi := want(i)
		for {
			out, in := r.Transport()
			if out == wo && in == wi {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("rank %d: transport to successor %q, from predecessor %q; want %q, %q", i, out, in, wo, wi)
			}
			time.Sleep(time.Millisecond) // polling for the peer's flag
		}
	}
}

// ipcInputs is a seeded buffer per rank, of values whose sums round.
func ipcInputs(n, length int, seed uint64) [][]float32 {
	rng := rand.New(rand.NewPCG(seed, 7))
	in := make([][]float32, n)
	for r := range in {
		in[r] = make([]float32, length)
		for i := range in[r] {
			in[r][i] = float32(rng.NormFloat64()) * float32(1+r)
		}
	}
	return in
}

// deviceAllReduce runs one device collective on every rank over fake
// device buffers holding inputs, and returns what each holds after.
func deviceAllReduce(t *testing.T, rings []*Ring, dev []*fakeDevice, inputs [][]float32, kind Op) [][]float32 {
	t.Helper()
	bufs := make([]*fakeBuf, len(rings))
	for i := range bufs {
		bufs[i] = &fakeBuf{f: append([]float32(nil), inputs[i]...)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for i, err := range parallel(len(rings), func(i int) error { return rings[i].AllReduceDevice(ctx, bufs[i], kind) }) {
		if err != nil {
			t.Fatalf("rank %d: %v", i, err)
		}
	}
	out := make([][]float32, len(bufs))
	for i, b := range bufs {
		out[i] = b.f
	}
	return out
}

// checkSameBits fails unless every rank's result has the bits of want.
func checkSameBits(t *testing.T, got [][]float32, want []float32, what string) {
	t.Helper()
	for r, g := range got {
		for i := range want {
			if math.Float32bits(g[i]) != math.Float32bits(want[i]) {
				t.Fatalf("%s: rank %d element %d = %v, want %v (the host ring's bits)", what, r, i, g[i], want[i])
			}
		}
	}
}

// TestIPCRing: rings whose hops are all cuda-ipc leave, on every rank, the
// bits the host shared-memory ring leaves for the same inputs (sum and
// average, 2 and 3 ranks, odd lengths that leave chunks short and slots
// wrapping), and the chunks went through the device slots.
func TestIPCRing(t *testing.T) {
	requireShm(t)
	checkNoLeaks(t)
	for _, n := range []int{2, 3} {
		t.Run(fmt.Sprintf("ranks=%d", n), func(t *testing.T) {
			devs := make([]*fakeDevice, n)
			rings := newIPCRings(t, n, func(i int, c *Config) {
				devs[i] = &fakeDevice{}
				c.Transport, c.Device, c.ShmSlots = TransportCUDAIPC, devs[i], 2
			})
			waitTransports(t, rings, func(int) (string, string) { return TransportCUDAIPC, TransportCUDAIPC })
			host := newIPCRings(t, n, func(i int, c *Config) { c.ShmSlots = 2 })
			for _, length := range []int{1, n, 1023, 1025*n + 3, 40000} {
				for _, kind := range []Op{Sum, Avg} {
					in := ipcInputs(n, length, uint64(length))
					want := allReduceAll(t, host, in, kind)[0]
					got := deviceAllReduce(t, rings, devs, in, kind)
					checkSameBits(t, got, want, fmt.Sprintf("length %d op %d", length, kind))
				}
			}
			if devs[0].fences == 0 {
				t.Fatal("no device work was waited for: the collectives did not run on the device path")
			}
			// Host collectives still work on a cuda-ipc ring, and
			// give the same bits.
			in := ipcInputs(n, 5000, 1)
			checkSameBits(t, allReduceAll(t, rings, in, Sum), allReduceAll(t, host, in, Sum)[0], "host collective on a cuda-ipc ring")
		})
	}
}

// TestIPCFallback: where the device slots cannot be used the job goes on,
// with the same bits: a successor's handle that cannot be opened (as in
// one process, or a bad handle), a rank not configured cuda-ipc, a gRPC
// hop (the device collective then runs on a host copy), bf16 on the wire.
func TestIPCFallback(t *testing.T) {
	requireShm(t)
	checkNoLeaks(t)
	const n = 3
	cases := []struct {
		name string
		mod  func(i int, c *Config, d *fakeDevice)
		want func(i int) (out, in string)
	}{
		{"open refused", func(i int, c *Config, d *fakeDevice) {
			c.Transport, c.Device, d.refuse = TransportCUDAIPC, d, true
		}, func(int) (string, string) { return TransportShm, TransportShm }},
		{"one rank refuses", func(i int, c *Config, d *fakeDevice) {
			c.Transport, c.Device, d.refuse = TransportCUDAIPC, d, i == 1
		}, func(i int) (string, string) {
			out, in := TransportCUDAIPC, TransportCUDAIPC
			if i == 1 {
				out = TransportShm
			}
			if i == 2 {
				in = TransportShm
			}
			return out, in
		}},
		{"one rank auto", func(i int, c *Config, d *fakeDevice) {
			c.Device = d
			if i != 0 {
				c.Transport = TransportCUDAIPC
			}
		}, func(i int) (string, string) {
			switch i {
			case 0:
				return TransportShm, TransportShm
			case 1:
				return TransportCUDAIPC, TransportShm
			}
			return TransportShm, TransportCUDAIPC
		}},
		{"one rank grpc", func(i int, c *Config, d *fakeDevice) {
			c.Device, c.Transport = d, TransportCUDAIPC
			if i == 2 {
				c.Transport = TransportGRPC
			}
		}, func(i int) (string, string) {
			switch i {
			case 0:
				return TransportCUDAIPC, TransportGRPC
			case 1:
				return TransportGRPC, TransportCUDAIPC
			}
			return TransportGRPC, TransportGRPC
		}},
		{"bf16 wire", func(i int, c *Config, d *fakeDevice) {
			c.Transport, c.Device, c.WireBF16 = TransportCUDAIPC, d, true
		}, func(int) (string, string) { return TransportCUDAIPC, TransportCUDAIPC }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			devs := make([]*fakeDevice, n)
			var bf16 bool
			rings := newIPCRings(t, n, func(i int, c *Config) {
				devs[i] = &fakeDevice{}
				tc.mod(i, c, devs[i])
				bf16 = c.WireBF16
			})
			waitTransports(t, rings, tc.want)
			host := newIPCRings(t, n, func(i int, c *Config) { c.WireBF16 = bf16 })
			for _, length := range []int{7, 3000, 20001} {
				in := ipcInputs(n, length, uint64(length))
				want := allReduceAll(t, host, in, Avg)[0]
				checkSameBits(t, deviceAllReduce(t, rings, devs, in, Avg), want, fmt.Sprintf("length %d", length))
			}
		})
	}
}

// TestIPCBadInput: the misuses a user can make fail with clear errors, and
// the peer's bytes are checked: an answer that is not a handle leaves the
// hop on host memory, and a slot claiming a device payload that cannot be
// there breaks the ring as a frame error naming the predecessor.
func TestIPCBadInput(t *testing.T) {
	requireShm(t)
	checkNoLeaks(t)
	t.Run("config", func(t *testing.T) {
		c := testConfig()
		c.Peers, c.Transport = []string{"a", "b"}, TransportCUDAIPC
		if err := c.Validate(); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "Device") {
			t.Fatalf("cuda-ipc without Device: %v, want ErrConfig naming Device", err)
		}
	})
	t.Run("no device", func(t *testing.T) {
		rings := newIPCRings(t, 2, func(int, *Config) {})
		err := rings[0].AllReduceDevice(context.Background(), &fakeBuf{f: make([]float32, 4)}, Sum)
		if !errors.Is(err, ErrConfig) {
			t.Fatalf("AllReduceDevice without Config.Device: %v, want ErrConfig", err)
		}
	})
	t.Run("bad answers", func(t *testing.T) {
		for _, ans := range []string{"", "declined: no GPU", "ok !!!", "ok " + "QUJD", "ok"} {
			r := &Ring{cfg: Config{Device: &fakeDevice{}}, log: testLogger(t)}
			reg := &shmRegion{geo: shmGeometry{queues: 1, slots: 2, slotBytes: 128}, mem: make([]byte, shmHdrBytes)}
			md := map[string][]string{}
			if ans != "" {
				md[ipcMetaKey] = []string{ans}
			}
			r.ipcOpen(reg, md)
			if reg.ipc != nil || reg.ipcFlag().Load() != 0 {
				t.Fatalf("answer %q: device slots opened", ans)
			}
		}
	})
	t.Run("device payload on a host hop", func(t *testing.T) {
		cfg := testConfig()
		cfg.ShmQueues = 1
		fp, r := newShmFakePred(t, cfg)
		h := &pb.FrameHeader{Kind: pb.Kind_KIND_DATA, Epoch: 5, SrcRank: 0, Op: 1, Step: 0, Chunk: 0, TotalElems: 8, Dtype: pb.DType_DTYPE_F32, Elems: 4}
		fp.put(0, h, func(slot []byte) { slot[slotWhereOff] = slotInDevice })
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := r.AllReduce(ctx, make([]float32, 8), Sum)
		var pe *PeerError
		if !errors.As(err, &pe) || pe.Rank != 0 || !errors.Is(err, ErrFrame) || !strings.Contains(err.Error(), "device memory") {
			t.Fatalf("err = %v, want a frame error from rank 0 about device memory", err)
		}
	})
}
