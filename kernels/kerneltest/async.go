package kerneltest

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"github.com/bmojo/bmojo/kernels"
)

// RunAsync is the conformance suite of kernels.AsyncCopier, the optional
// copies that overlap later ops. Its reference is the backend's own
// Download and Upload: an async copy must move the same bits as they would
// at the same point of the op order, leave the elements around it alone,
// and let its wait be called from any goroutine. A backend without the
// interface skips, visibly.
func RunAsync[F kernels.Float](t *testing.T, newBackend func() kernels.Backend[F]) {
	if _, ok := newBackend().(kernels.AsyncCopier[F]); !ok {
		t.Skipf("%s does not implement kernels.AsyncCopier", newBackend().Name())
	}
	seed := runSeed()
	t.Logf("kerneltest: seed %d (replay with -kerneltest.seed=%d)", seed, seed)
	for i, tc := range []struct {
		name string
		fn   func(h *harness[F], ac kernels.AsyncCopier[F])
	}{
		{"DownloadView", testDownloadAsyncView[F]},
		{"DownloadAfterOps", testDownloadAsyncAfterOps[F]},
		{"DownloadPendingZero", testDownloadAsyncZero[F]},
		{"ManyInFlight", testAsyncManyInFlight[F]},
		{"UploadView", testUploadAsyncView[F]},
		{"UploadSourceReused", testUploadAsyncReuse[F]},
		{"RoundTrip", testAsyncRoundTrip[F]},
		{"Empty", testAsyncEmpty[F]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			be := newBackend()
			h := &harness[F]{t: t, be: be, rng: rand.New(rand.NewPCG(seed, uint64(100+i)))}
			tc.fn(h, be.(kernels.AsyncCopier[F]))
			h.done()
		})
	}
	t.Run("Errors", func(t *testing.T) { runAsyncErrors(t, newBackend) })
}

// host returns data as F.
func host[F kernels.Float](data []float64) []F {
	out := make([]F, len(data))
	for i, v := range data {
		out[i] = F(v)
	}
	return out
}

// sameBits reports the first few elements where got and want differ
// (compared as F, so -0 and NaN payloads count).
func sameBits[F kernels.Float](t *testing.T, name string, got, want []F) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s: %d elements, want %d", name, len(got), len(want))
		return
	}
	bad := 0
	for i := range got {
		if fmt.Sprint(got[i]) != fmt.Sprint(want[i]) {
			if bad < 4 {
				t.Errorf("%s[%d] = %v, want %v", name, i, got[i], want[i])
			}
			bad++
		}
	}
	if bad > 4 {
		t.Errorf("%s: %d of %d elements differ", name, bad, len(got))
	}
}

// download is the reference: the backend's synchronous Download.
func download[F kernels.Float](be kernels.Backend[F], b kernels.Buffer) []F {
	out := make([]F, b.Len())
	be.Download(out, b)
	return out
}

// testDownloadAsyncView copies a guarded view into the middle of a host
// slice whose other elements must stay.
func testDownloadAsyncView[F kernels.Float](h *harness[F], ac kernels.AsyncCopier[F]) {
	a := h.randn(37, 1)
	x := h.buf("x", a)
	dst := make([]F, 3+len(a)+3)
	for i := range dst {
		dst[i] = sentinel
	}
	if err := ac.DownloadAsync(dst[3:3+len(a)], x)(); err != nil {
		h.t.Fatalf("wait: %v", err)
	}
	want := host[F](slices.Concat([]float64{sentinel, sentinel, sentinel}, a, []float64{sentinel, sentinel, sentinel}))
	sameBits(h.t, "download", dst, want)
}

// testDownloadAsyncAfterOps: the copy sees every op issued before it, and
// ops issued after it that write other buffers (reading the source) do not
// disturb it.
func testDownloadAsyncAfterOps[F kernels.Float](h *harness[F], ac kernels.AsyncCopier[F]) {
	const n = 1000
	x, y := h.buf("x", h.randn(n, 1)), h.buf("y", h.randn(n, 1))
	h.be.Accumulate(x, y)
	h.be.Scale(x, 0.75)
	got := make([]F, n)
	wait := ac.DownloadAsync(got, x)
	z := h.out("z", n)
	for range 8 { // later work, reading x, writing z
		h.be.Copy(z, x)
		h.be.Accumulate(z, y)
		h.be.Scale(z, 1.5)
	}
	if err := wait(); err != nil {
		h.t.Fatalf("wait: %v", err)
	}
	sameBits(h.t, "download after ops", got, download(h.be, x))
}

// testDownloadAsyncZero: a Zero issued before the copy (which a backend may
// defer) is in it.
func testDownloadAsyncZero[F kernels.Float](h *harness[F], ac kernels.AsyncCopier[F]) {
	x := h.buf("x", h.randn(300, 1))
	h.be.Zero(x)
	got := host[F](h.randn(300, 1))
	if err := ac.DownloadAsync(got, x)(); err != nil {
		h.t.Fatalf("wait: %v", err)
	}
	sameBits(h.t, "download of zeroed", got, make([]F, 300))
}

// testAsyncManyInFlight starts copies of buffers of odd sizes (one large),
// each written by ops just before it, and waits for them from separate
// goroutines in reverse order, twice each.
func testAsyncManyInFlight[F kernels.Float](h *harness[F], ac kernels.AsyncCopier[F]) {
	sizes := []int{1, 7, 513, 4099, 1 << 18, 31, 130}
	bufs := make([]kernels.Buffer, len(sizes))
	got := make([][]F, len(sizes))
	waits := make([]func() error, len(sizes))
	acc := h.buf("acc", h.randn(1<<18, 1))
	for i, n := range sizes {
		bufs[i] = h.buf(fmt.Sprintf("b%d", i), h.randn(n, 1))
		h.be.Accumulate(bufs[i], h.be.Slice(acc, 0, n))
		h.be.Scale(bufs[i], float64(i)+0.5)
		got[i] = make([]F, n)
		waits[i] = ac.DownloadAsync(got[i], bufs[i])
		h.be.Scale(h.be.Slice(acc, 0, n), 2) // writes a buffer the copy only read before it
	}
	var wg sync.WaitGroup
	errs := make([]error, len(sizes))
	for i := len(sizes) - 1; i >= 0; i-- {
		wg.Go(func() {
			errs[i] = waits[i]()
			if err := waits[i](); err != errs[i] {
				errs[i] = fmt.Errorf("second wait returned %v, the first %v", err, errs[i])
			}
		})
	}
	wg.Wait()
	for i := range sizes {
		if errs[i] != nil {
			h.t.Fatalf("copy %d: %v", i, errs[i])
		}
		sameBits(h.t, fmt.Sprintf("copy %d (%d elements)", i, sizes[i]), got[i], download(h.be, bufs[i]))
	}
}

// testUploadAsyncView writes into a guarded view; an op issued after it
// reads the new values.
func testUploadAsyncView[F kernels.Float](h *harness[F], ac kernels.AsyncCopier[F]) {
	a := h.randn(29, 1)
	y := h.out("y", len(a))
	wait := ac.UploadAsync(y, host[F](a))
	h.be.Scale(y, 2)
	if err := wait(); err != nil {
		h.t.Fatalf("wait: %v", err)
	}
	ref := h.buf("ref", a)
	h.be.Scale(ref, 2)
	sameBits(h.t, "upload then scale", download(h.be, y), download(h.be, ref))
}

// testUploadAsyncReuse overwrites the source as soon as wait returns, as a
// caller reusing its buffer does: the device must hold the old values.
func testUploadAsyncReuse[F kernels.Float](h *harness[F], ac kernels.AsyncCopier[F]) {
	const n = 1 << 16
	a := host[F](h.randn(n, 1))
	want := slices.Clone(a)
	y := h.out("y", n)
	if err := ac.UploadAsync(y, a)(); err != nil {
		h.t.Fatalf("wait: %v", err)
	}
	for i := range a {
		a[i] = -a[i] - 1
	}
	sameBits(h.t, "upload with its source reused", download(h.be, y), want)
}

// testAsyncRoundTrip is a data-parallel step's pattern: download ranges as
// they are produced, change them on the host, upload them all, then
// read them on the device.
func testAsyncRoundTrip[F kernels.Float](h *harness[F], ac kernels.AsyncCopier[F]) {
	const ranges, n = 6, 777
	g := h.buf("g", h.randn(ranges*n, 1))
	host := make([][]F, ranges)
	downs := make([]func() error, ranges)
	for r := ranges - 1; r >= 0; r-- { // last range first, as backward
		v := h.be.Slice(g, r*n, n)
		h.be.Scale(v, 3)
		host[r] = make([]F, n)
		downs[r] = ac.DownloadAsync(host[r], v)
	}
	want := make([]F, 0, ranges*n)
	ups := make([]func() error, ranges)
	for r := range ranges {
		if err := downs[r](); err != nil {
			h.t.Fatalf("download %d: %v", r, err)
		}
		for i := range host[r] {
			host[r][i] = host[r][i]*2 + F(r)
		}
		want = append(want, host[r]...)
		ups[r] = ac.UploadAsync(h.be.Slice(g, r*n, n), host[r])
	}
	for r := range ranges {
		if err := ups[r](); err != nil {
			h.t.Fatalf("upload %d: %v", r, err)
		}
	}
	sameBits(h.t, "round trip", download(h.be, g), want)
}

func testAsyncEmpty[F kernels.Float](h *harness[F], ac kernels.AsyncCopier[F]) {
	x := h.be.Alloc(0)
	if err := ac.DownloadAsync(nil, x)(); err != nil {
		h.t.Errorf("empty download: %v", err)
	}
	if err := ac.UploadAsync(x, nil)(); err != nil {
		h.t.Errorf("empty upload: %v", err)
	}
}

// runAsyncErrors: a copy that breaks its contract fails as the synchronous
// copy does (the same message, recorded for Err) and its wait returns that
// error instead of blocking; copies after a failure return it too.
func runAsyncErrors[F kernels.Float](t *testing.T, newBackend func() kernels.Backend[F]) {
	for _, tc := range []struct {
		name  string
		sync  func(be kernels.Backend[F], x kernels.Buffer)
		async func(ac kernels.AsyncCopier[F], x kernels.Buffer) func() error
	}{
		{"download short", func(be kernels.Backend[F], x kernels.Buffer) { be.Download(make([]F, 9), x) },
			func(ac kernels.AsyncCopier[F], x kernels.Buffer) func() error {
				return ac.DownloadAsync(make([]F, 9), x)
			}},
		{"upload long", func(be kernels.Backend[F], x kernels.Buffer) { be.Upload(x, make([]F, 11)) },
			func(ac kernels.AsyncCopier[F], x kernels.Buffer) func() error {
				return ac.UploadAsync(x, make([]F, 11))
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ref := newBackend()
			tc.sync(ref, ref.Alloc(10))
			want := ref.Err()
			if want == nil {
				t.Fatal("the synchronous copy recorded no error")
			}
			be := newBackend()
			ac := be.(kernels.AsyncCopier[F])
			err := tc.async(ac, be.Alloc(10))()
			if err == nil || err.Error() != want.Error() {
				t.Errorf("wait: %v, want %v", err, want)
			}
			if got := be.Err(); got == nil || got.Error() != want.Error() {
				t.Errorf("Err: %v, want %v", got, want)
			}
			after := be.Alloc(4)
			if err := ac.DownloadAsync(make([]F, 4), after)(); err == nil || err.Error() != want.Error() {
				t.Errorf("download after the failure: %v, want %v", err, want)
			}
		})
	}
}
