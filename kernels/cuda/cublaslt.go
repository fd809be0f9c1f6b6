//go:build cuda && !cudaemu

package cuda

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>

// cuBLASLt, loaded at run time like cuBLAS (cublas.go): the bf16 products
// go through cublasLtMatmul with an algorithm chosen once per shape by
// cublasLtMatmulAlgoGetHeuristic, as PyTorch does; cublasGemmEx's default
// choice was up to 20 % slower on the 130m shapes. Enum values and the
// heuristic result layout are from cublasLt.h, stable across CUDA 11–13.
typedef int (*lt_create_t)(void **);
typedef int (*lt_desc_create_t)(void **, int, int);
typedef int (*lt_set_t)(void *, int, const void *, size_t);
typedef int (*lt_layout_create_t)(void **, int, uint64_t, uint64_t, int64_t);
typedef int (*lt_destroy_t)(void *);
typedef int (*lt_heur_t)(void *, void *, void *, void *, void *, void *, void *, int, void *, int *);
typedef int (*lt_matmul_t)(void *, void *, const void *, const void *, void *, const void *, void *, const void *,
	const void *, void *, void *, void *, const void *, void *, size_t, void *);

typedef struct {
	void *handle;
	void *descCreate, *descSet, *layoutCreate, *prefCreate, *prefSet, *prefDestroy, *heur, *matmul;
} bm_lt;

// cublasLtMatmulHeuristicResult_t: the algorithm (8 words), workspace size,
// state, waves, 4 reserved ints (96 bytes).
typedef struct {
	uint64_t algo[8];
	size_t ws;
	int state;
	float waves;
	int reserved[4];
} bm_lt_heur;

// BM_LT_CANDS is how many of the heuristic's algorithms a plan keeps, best
// guess first, for the timing that picks one (gpu.tune).
#define BM_LT_CANDS 16

typedef struct {
	void *desc, *a, *b, *c;
	bm_lt_heur h; // the algorithm run
	bm_lt_heur cand[BM_LT_CANDS];
	int ncand;
} bm_lt_plan;

static int bm_lt_create(void *f, void **h) { return ((lt_create_t)f)(h); }

// bm_lt_make_plan describes C[m,n] (fp32) = op(A)·op(B) with A, B bf16,
// fp32 compute and scale, column-major, and asks for the algorithms that
// fit the workspace and the operands' alignments, best guess first.
static int bm_lt_make_plan(bm_lt *lt, bm_lt_plan *p, int ta, int tb, int m, int n, int k, int lda, int ldb, int ldc,
	uint64_t wsBytes, uint32_t alignA, uint32_t alignB, uint32_t alignC, uint32_t alignD) {
	int st = ((lt_desc_create_t)lt->descCreate)(&p->desc, 68, 0); // CUBLAS_COMPUTE_32F, CUDA_R_32F
	if (st) return st;
	int32_t opA = ta, opB = tb;
	if ((st = ((lt_set_t)lt->descSet)(p->desc, 3, &opA, sizeof opA))) return st; // TRANSA
	if ((st = ((lt_set_t)lt->descSet)(p->desc, 4, &opB, sizeof opB))) return st; // TRANSB
	lt_layout_create_t mk = (lt_layout_create_t)lt->layoutCreate;
	if ((st = mk(&p->a, 14, ta ? k : m, ta ? m : k, lda))) return st; // CUDA_R_16BF
	if ((st = mk(&p->b, 14, tb ? n : k, tb ? k : n, ldb))) return st;
	if ((st = mk(&p->c, 0, m, n, ldc))) return st; // CUDA_R_32F
	void *pref;
	if ((st = ((lt_create_t)lt->prefCreate)(&pref))) return st;
	lt_set_t ps = (lt_set_t)lt->prefSet;
	st = ps(pref, 1, &wsBytes, sizeof wsBytes); // MAX_WORKSPACE_BYTES
	if (!st) st = ps(pref, 5, &alignA, sizeof alignA); // MIN_ALIGNMENT_A..D_BYTES
	if (!st) st = ps(pref, 6, &alignB, sizeof alignB);
	if (!st) st = ps(pref, 7, &alignC, sizeof alignC);
	if (!st) st = ps(pref, 8, &alignD, sizeof alignD);
	int found = 0;
	if (!st) st = ((lt_heur_t)lt->heur)(lt->handle, p->desc, p->a, p->b, p->c, p->c, pref, BM_LT_CANDS, p->cand, &found);
	((lt_destroy_t)lt->prefDestroy)(pref);
	if (st) return st;
	p->ncand = found;
	if (found > 0) p->h = p->cand[0];
	return found > 0 ? 0 : -1;
}

static void bm_lt_choose(bm_lt_plan *p, int i) { p->h = p->cand[i]; }

static int bm_lt_run(bm_lt *lt, bm_lt_plan *p, float alpha, uint64_t A, uint64_t B, float beta, uint64_t C, uint64_t D,
	uint64_t ws, uint64_t wsBytes, void *stream) {
	return ((lt_matmul_t)lt->matmul)(lt->handle, p->desc, &alpha, (const void *)A, p->a, (const void *)B, p->b, &beta,
		(const void *)C, p->c, (void *)D, p->c, p->h.algo, (void *)ws, wsBytes, stream);
}
*/
import "C"

import (
	"fmt"
	"math"
	"strings"
	"unsafe"
)

// cublasLt is a loaded cuBLASLt with its handle and the plans made so far.
type cublasLt struct {
	lib     string
	lt      *C.bm_lt // C memory: handed to C calls
	plans   map[ltKey]*ltPlan
	ws      uint64
	wsBytes int64
}

// tunings returns how each product shape's algorithm was chosen so far.
func (l *cublasLt) tunings() []GemmTuning {
	var out []GemmTuning
	for _, p := range l.plans {
		if p != nil && p.tune != nil {
			out = append(out, *p.tune)
		}
	}
	return out
}

// ltKey is what an algorithm choice depends on.
type ltKey struct {
	ta, tb                 bool
	m, n, k, lda, ldb, ld  int
	alignA, alignB, alignC uint32
	alignD                 uint32
}

// loadCublasLt opens the cuBLASLt beside cuBLAS (lib is cuBLAS's name).
func loadCublasLt(lib string, ws uint64, wsBytes int64) (*cublasLt, error) {
	names := []string{strings.Replace(lib, "libcublas.", "libcublasLt.", 1), "libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11"}
	dl, name, err := dlopenFirst(names)
	if err != nil {
		return nil, fmt.Errorf("cuda: cuBLASLt not found: %w", err)
	}
	sym := func(s string) (unsafe.Pointer, error) { return dlsym(dl, name, s) }
	lt := (*C.bm_lt)(C.calloc(1, C.size_t(unsafe.Sizeof(C.bm_lt{}))))
	for _, f := range []struct {
		name string
		dst  *unsafe.Pointer
	}{
		{"cublasLtMatmulDescCreate", &lt.descCreate}, {"cublasLtMatmulDescSetAttribute", &lt.descSet},
		{"cublasLtMatrixLayoutCreate", &lt.layoutCreate}, {"cublasLtMatmulPreferenceCreate", &lt.prefCreate},
		{"cublasLtMatmulPreferenceSetAttribute", &lt.prefSet}, {"cublasLtMatmulPreferenceDestroy", &lt.prefDestroy},
		{"cublasLtMatmulAlgoGetHeuristic", &lt.heur}, {"cublasLtMatmul", &lt.matmul},
	} {
		p, err := sym(f.name)
		if err != nil {
			C.free(unsafe.Pointer(lt))
			return nil, err
		}
		*f.dst = p
	}
	create, err := sym("cublasLtCreate")
	if err != nil {
		C.free(unsafe.Pointer(lt))
		return nil, err
	}
	if st := C.bm_lt_create(create, &lt.handle); st != 0 {
		C.free(unsafe.Pointer(lt))
		return nil, fmt.Errorf("cuda: cublasLtCreate: status %d", int(st))
	}
	return &cublasLt{lib: name, lt: lt, plans: map[ltKey]*ltPlan{}, ws: ws, wsBytes: wsBytes}, nil
}

// align is the largest power of two up to 256 that divides p.
func align(p uint64) uint32 {
	a := uint32(256)
	for a > 1 && p%uint64(a) != 0 {
		a /= 2
	}
	return a
}

// ltPlan is a product shape's cuBLASLt description with its algorithm.
type ltPlan struct {
	c    *C.bm_lt_plan // C memory: handed to C calls
	tune *GemmTuning   // how the algorithm was chosen; nil before the first run
}

// plan returns the plan of a product (made on first use); nil when
// cuBLASLt has no algorithm for it (the caller falls back to
// cublasGemmEx).
func (l *cublasLt) plan(transA, transB bool, m, n, k, lda, ldb, ldc int, A, B, Cin, D uint64) *ltPlan {
	key := ltKey{transA, transB, m, n, k, lda, ldb, ldc, align(A), align(B), align(Cin), align(D)}
	p, seen := l.plans[key]
	if seen {
		return p
	}
	c := (*C.bm_lt_plan)(C.calloc(1, C.size_t(unsafe.Sizeof(C.bm_lt_plan{}))))
	st := C.bm_lt_make_plan(l.lt, c, C.int(boolInt(transA)), C.int(boolInt(transB)), C.int(m), C.int(n), C.int(k),
		C.int(lda), C.int(ldb), C.int(ldc), C.uint64_t(l.wsBytes), C.uint32_t(key.alignA), C.uint32_t(key.alignB), C.uint32_t(key.alignC), C.uint32_t(key.alignD))
	if st != 0 {
		C.free(unsafe.Pointer(c))
	} else {
		p = &ltPlan{c: c}
	}
	l.plans[key] = p // nil: cublasGemmEx for this shape from now on
	return p
}

// run queues the product with the plan's algorithm.
func (l *cublasLt) run(stream unsafe.Pointer, p *ltPlan, m, n, k int, alpha float32, A, B uint64, beta float32, D, Cin uint64) error {
	if st := C.bm_lt_run(l.lt, p.c, C.float(alpha), C.uint64_t(A), C.uint64_t(B), C.float(beta), C.uint64_t(Cin), C.uint64_t(D),
		C.uint64_t(l.ws), C.uint64_t(l.wsBytes), stream); st != 0 {
		return fmt.Errorf("cublasLtMatmul(m=%d n=%d k=%d): status %d", m, n, k, int(st))
	}
	return nil
}

// tuneReps is how many runs of each candidate one timing averages.
const tuneReps = 10

// tune times each of the plan's candidate algorithms on the product's own
// operands and keeps the fastest, as PyTorch's TunableOp does (cuBLASLt's
// first guess was up to 1.8× slower on the 130m model's shapes). A product
// that adds into its own C is timed in place on a copy of C (cuBLASLt's
// kernels run slower in place than into a separate D, so timing it
// out of place would mislead), so the result it is asked for is computed
// once, by the caller's run. Without memory for the copy, the first guess
// is kept. Device thread.
func (g *gpu) tune(p *ltPlan, t GemmTuning, alpha float32, A, B uint64, beta float32, D, Cin uint64, ldc int) {
	t.Candidates = int(p.c.ncand)
	p.tune = &t
	if t.Candidates < 2 {
		return
	}
	out := D
	if beta != 0 && Cin == D {
		bytes := 4 * int64(ldc) * int64(t.N)
		s, err := g.malloc(bytes)
		if err != nil {
			t.Note = "no device memory to time candidates"
			return
		}
		defer g.free(s) // after the sync below
		if err := g.dtod(s, devptr(D), bytes); err != nil {
			t.Note = fmt.Sprintf("copying C to time candidates: %v", err)
			return
		}
		out, Cin = uint64(s), uint64(s)
	}
	stream := *(*unsafe.Pointer)(unsafe.Pointer(&g.stream))
	timeOne := func(i int) (float64, error) {
		C.bm_lt_choose(p.c, C.int(i))
		// One untimed run: a failure costs no timing, and the first launch
		// of a kernel loads it.
		if err := g.lt.run(stream, p, t.M, t.N, t.K, alpha, A, B, beta, out, Cin); err != nil {
			return 0, err
		}
		from, err := g.mark()
		if err != nil {
			return 0, err
		}
		for range tuneReps {
			if err := g.lt.run(stream, p, t.M, t.N, t.K, alpha, A, B, beta, out, Cin); err != nil {
				return 0, err
			}
		}
		to, err := g.mark()
		if err != nil {
			return 0, err
		}
		if err := g.sync(); err != nil {
			return 0, err
		}
		ms, err := g.since(from, to)
		return ms / tuneReps, err
	}
	best, bestMs := 0, math.Inf(1)
	for i := range t.Candidates {
		ms, err := timeOne(i)
		if err != nil {
			continue // an algorithm cuBLASLt offered but cannot run here
		}
		if i == 0 {
			t.HeuristicMs = ms
		}
		if ms < bestMs {
			best, bestMs = i, ms
		}
	}
	if math.IsInf(bestMs, 1) {
		best, bestMs = 0, 0
	}
	t.Chosen, t.ChosenMs = best, bestMs
	C.bm_lt_choose(p.c, C.int(best))
}
