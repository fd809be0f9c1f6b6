package allreduce

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// newHier builds hosts × local hierarchical ranks on loopback: per host a
// local ring (shared memory where this machine has it), per local index a
// cross-host ring over gRPC. Rank h·local+l is local rank l of host h.
func newHier(t *testing.T, hosts, local int, bf16 bool) []*Hier {
	t.Helper()
	return newHierOver(t, hosts, local, bf16, TransportGRPC)
}

// newHierOver is newHier with the cross-host rings on transport.
func newHierOver(t *testing.T, hosts, local int, bf16 bool, transport string) []*Hier {
	t.Helper()
	locals := make([][]*Ring, hosts)
	for h := range locals {
		locals[h] = newRings(t, local, func(_ int, c *Config) { c.WireBF16 = bf16 })
	}
	cross := make([][]*Ring, local)
	for l := range cross {
		cross[l] = newRings(t, hosts, func(_ int, c *Config) { c.WireBF16, c.Transport = bf16, transport })
	}
	out := make([]*Hier, 0, hosts*local)
	for h := range hosts {
		for l := range local {
			out = append(out, &Hier{Local: locals[h][l], Cross: cross[l][h]})
		}
	}
	for i, h := range out {
		if h.Rank() != i || h.Size() != hosts*local {
			t.Fatalf("rank %d says it is rank %d of %d", i, h.Rank(), h.Size())
		}
	}
	return out
}

// TestHierMatchesTheSum: every shape of hosts × ranks per host (one host,
// one rank per host, both), odd lengths (lengths below the rank count
// leave some ranks an empty share), sum and average, float32 and bf16 on
// the wire: each rank ends with the float64 reduction of all ranks' inputs
// (within the wire's tolerance) and the same bits as every other rank. The
// cross-host rings run over gRPC streams, and for two shapes over data
// sockets too.
func TestHierMatchesTheSum(t *testing.T) {
	checkNoLeaks(t)
	type shape struct {
		hosts, local int
		cross        string
	}
	var shapes []shape
	for _, s := range [][2]int{{2, 2}, {3, 2}, {2, 3}, {1, 3}, {3, 1}, {1, 1}} {
		shapes = append(shapes, shape{s[0], s[1], TransportGRPC})
	}
	shapes = append(shapes, shape{2, 2, TransportSocket}, shape{3, 2, TransportSocket})
	for _, sh := range shapes {
		for _, bf16 := range []bool{false, true} {
			hosts, local := sh.hosts, sh.local
			if hosts*local == 1 && bf16 {
				continue
			}
			t.Run(fmt.Sprintf("hosts=%d/local=%d/cross=%s/bf16=%v", hosts, local, sh.cross, bf16), func(t *testing.T) {
				hs := newHierOver(t, hosts, local, bf16, sh.cross)
				n := hosts * local
				for _, l := range oddLengths(n, 1024) {
					for _, kind := range []Op{Sum, Avg} {
						in := seededInputs(uint64(l)+7, n, l)
						bufs := make([][]float32, n)
						for i := range bufs {
							bufs[i] = append([]float32(nil), in[i]...)
						}
						ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
						errs := parallel(n, func(i int) error { return hs[i].AllReduce(ctx, bufs[i], kind) })
						cancel()
						for i, err := range errs {
							if err != nil {
								t.Fatalf("length %d: rank %d: %v", l, i, err)
							}
						}
						// bf16 rounds a value on the wire up to three
						// times (in the host, across, the gather's
						// rounding of an average) instead of once; the
						// bf16 tolerance covers it.
						checkResults(t, in, bufs, kind, bf16)
					}
				}
			})
		}
	}
}

// TestHierBucketsOverlap: buckets started back to back (Start), as
// backward starts them, and waited for in reverse order, each end with the
// sum, bitwise identical across ranks; the collective is idle afterwards
// (no goroutine left running: checkNoLeaks).
func TestHierBucketsOverlap(t *testing.T) {
	checkNoLeaks(t)
	hs := newHier(t, 2, 2, false)
	colls := make([]Collective, len(hs))
	for r, h := range hs {
		colls[r] = h
	}
	checkBucketsOverlap(t, colls, []int{50_000, 1, 0, 12_345, 3, 7}, 11)
}

// TestHierFailure: a rank goes away in the middle of a collective (both of
// its rings closed under it, as a killed process's would break). Every
// other rank fails, well before its hop deadline, and no error blames
// anyone but the dead rank, by its global number: its neighbours in either
// ring name it, and the ranks that only hear of it through the other ring
// blame nobody (no *PeerError), so a worker reports no innocent peer.
func TestHierFailure(t *testing.T) {
	checkNoLeaks(t)
	for _, victim := range []int{0, 3} {
		t.Run(fmt.Sprintf("victim=%d", victim), func(t *testing.T) {
			hs := newHier(t, 2, 2, false)
			n := len(hs)
			bufs := make([][]float32, n)
			for i := range bufs {
				bufs[i] = make([]float32, 4<<20) // long enough to be mid-flight when it goes
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			start := time.Now()
			handles := make([]*Handle, n)
			for i := range hs {
				handles[i] = hs[i].Start(bufs[i], Sum)
			}
			time.Sleep(20 * time.Millisecond) // let the collective get going
			gone := time.Now()
			closed := make(chan error, 1)
			go func() { closed <- hs[victim].Close() }()
			took := make([]time.Duration, n)
			errs := parallel(n, func(i int) error {
				err := handles[i].Wait(ctx)
				took[i] = time.Since(gone)
				return err
			})
			if err := <-closed; err != nil {
				t.Fatal(err)
			}
			if ctx.Err() != nil {
				t.Fatalf("the ranks hung until the deadline: %v", errs)
			}
			for i, d := range took {
				if i != victim && d > testConfig().HopTimeout/2 {
					t.Errorf("rank %d failed %v after rank %d went: that is a hop deadline, not the failure travelling", i, d, victim)
				}
			}
			t.Logf("started %v before the rank went; the survivors failed within %v of it", gone.Sub(start).Round(time.Millisecond), slices.Max(took).Round(time.Millisecond))
			named := 0
			for i, err := range errs {
				if i == victim {
					if !errors.Is(err, ErrClosed) {
						t.Errorf("the closed rank %d: %v, want ErrClosed", i, err)
					}
					continue
				}
				if err == nil {
					t.Fatalf("rank %d finished a collective whose rank %d went away", i, victim)
				}
				var pe *PeerError
				if errors.As(err, &pe) {
					if pe.Rank != victim {
						t.Errorf("rank %d blames rank %d, not the rank that went (%d): %v", i, pe.Rank, victim, err)
					}
					named++
				}
				if hs[i].Err() == nil {
					t.Errorf("rank %d: Err() is nil after a failed collective", i)
				}
			}
			if named == 0 {
				t.Errorf("no survivor named the rank that went: %v", errs)
			}
		})
	}
}

// TestHierCrossRingClosed: a cross-host ring closed before the collective
// fails it on the rank that uses it, saying where, and the others of both
// its rings within a hop timeout.
func TestHierCrossRingClosed(t *testing.T) {
	checkNoLeaks(t)
	hs := newHier(t, 2, 2, false)
	// Local index 1's cross ring goes away on host 0.
	if err := hs[1].Cross.Close(); err != nil {
		t.Fatal(err)
	}
	bufs := make([][]float32, len(hs))
	for i := range bufs {
		bufs[i] = make([]float32, 4096)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	start := time.Now()
	errs := parallel(len(hs), func(i int) error { return hs[i].AllReduce(ctx, bufs[i], Sum) })
	if ctx.Err() != nil {
		t.Fatalf("the ranks hung until the deadline: %v", errs)
	}
	if !errors.Is(errs[1], ErrClosed) || !strings.Contains(errs[1].Error(), "across hosts") {
		t.Fatalf("rank 1 (its cross ring closed): %v, want ErrClosed across hosts", errs[1])
	}
	for i, err := range errs {
		if err == nil {
			t.Fatalf("rank %d finished a collective that a closed ring was part of", i)
		}
	}
	if el := time.Since(start); el > testConfig().HopTimeout {
		t.Errorf("failing took %v, longer than a hop deadline", el)
	}
}

// TestHierNeedsRings: a Hier without its rings is a configuration error,
// not a panic.
func TestHierNeedsRings(t *testing.T) {
	h := &Hier{}
	if err := h.AllReduce(context.Background(), make([]float32, 4), Sum); !errors.Is(err, ErrConfig) {
		t.Fatalf("AllReduce: got %v, want ErrConfig", err)
	}
	if err := h.Connect(context.Background()); !errors.Is(err, ErrConfig) {
		t.Fatalf("Connect: got %v, want ErrConfig", err)
	}
	if err := h.Err(); !errors.Is(err, ErrConfig) {
		t.Fatalf("Err: got %v, want ErrConfig", err)
	}
	if h.Size() != 0 || h.Close() != nil {
		t.Fatal("Size or Close of an empty Hier")
	}
}

// TestHierDevice: a hierarchical all-reduce whose local rings carry device
// slots (cuda-ipc, fake devices) reduces device buffers inside each host on
// the device and leaves, on every rank, the bits the host hierarchy leaves
// for the same inputs (sum and average, odd lengths).
func TestHierDevice(t *testing.T) {
	requireShm(t)
	checkNoLeaks(t)
	for _, sh := range [][2]int{{2, 2}, {3, 2}} {
		hosts, local := sh[0], sh[1]
		t.Run(fmt.Sprintf("hosts=%d/local=%d", hosts, local), func(t *testing.T) {
			n := hosts * local
			devs := make([]*fakeDevice, n)
			locals := make([][]*Ring, hosts)
			for h := range locals {
				locals[h] = newIPCRings(t, local, func(i int, c *Config) {
					devs[h*local+i] = &fakeDevice{}
					c.Transport, c.Device, c.ShmSlots = TransportCUDAIPC, devs[h*local+i], 2
				})
				waitTransports(t, locals[h], func(int) (string, string) { return TransportCUDAIPC, TransportCUDAIPC })
			}
			cross := make([][]*Ring, local)
			for l := range cross {
				cross[l] = newRings(t, hosts, func(_ int, c *Config) { c.Transport = TransportGRPC })
			}
			hs := make([]*Hier, n)
			for h := range hosts {
				for l := range local {
					hs[h*local+l] = &Hier{Local: locals[h][l], Cross: cross[l][h]}
					if !hs[h*local+l].DeviceNative() {
						t.Fatalf("rank %d: the local ring does not reduce on the device", h*local+l)
					}
				}
			}
			host := newHierOver(t, hosts, local, false, TransportGRPC)
			for _, length := range []int{1, n, 1023, 40000 + 3} {
				for _, kind := range []Op{Sum, Avg} {
					in := ipcInputs(n, length, uint64(length)+3)
					want := make([][]float32, n)
					for i := range want {
						want[i] = append([]float32(nil), in[i]...)
					}
					ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
					for i, err := range parallel(n, func(i int) error { return host[i].AllReduce(ctx, want[i], kind) }) {
						if err != nil {
							t.Fatalf("host hierarchy, rank %d: %v", i, err)
						}
					}
					bufs := make([]*fakeBuf, n)
					for i := range bufs {
						bufs[i] = &fakeBuf{f: append([]float32(nil), in[i]...)}
					}
					for i, err := range parallel(n, func(i int) error { return hs[i].StartDevice(bufs[i], kind).Wait(ctx) }) {
						if err != nil {
							t.Fatalf("device hierarchy, rank %d: %v", i, err)
						}
					}
					cancel()
					got := make([][]float32, n)
					for i, b := range bufs {
						got[i] = b.f
					}
					checkSameBits(t, got, want[0], fmt.Sprintf("length %d op %d", length, kind))
				}
			}
			for i, d := range devs {
				if d.fences == 0 {
					t.Errorf("rank %d: no device work was waited for", i)
				}
			}
		})
	}
}
