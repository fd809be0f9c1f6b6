//go:build cuda && cudaemu

// The CPU emulation of the CUDA kernels (build tag cudaemu): the same
// csrc/*.cu sources compiled by the host C++ compiler on top of emu/emu.h,
// and a launcher that runs every block's threads as fibers.
#include "emu/emu.h"

#include "emu/sources.inc"

#include <vector>

namespace bm_emu {

State st;

typedef void (*entry_fn)(void **);

template <class... A, size_t... I>
static void call_with(void (*f)(A...), void **a, std::index_sequence<I...>) {
    f(*reinterpret_cast<A *>(a[I])...);
}

template <class... A> static void invoke(void (*f)(A...), void **a) {
    call_with(f, a, std::index_sequence_for<A...>{});
}

struct Entry {
    const char *name;
    entry_fn fn;
    int nargs;
};

template <class... A> static constexpr int arity(void (*)(A...)) { return sizeof...(A); }

#define BM_KERNEL(k) {#k, [](void **a) { invoke(k, a); }, arity(k)},
static const Entry table[] = {
#include "emu/kernels.inc"
};

static const size_t kStack = 256 << 10;
static std::vector<Fiber> fibers;
static std::vector<char *> stacks;
static entry_fn cur_fn;
static void **cur_args;

static void fiber_entry() {
    cur_fn(cur_args);
    st.cur->wait = DONE;
    _longjmp(st.sched, 1); // never returns: the scheduler's frame is current
}

} // namespace bm_emu

using namespace bm_emu;

extern "C" int bm_emu_launch(const char *name, int gx, int gy, int gz, int bx, int by, int bz, int shmem,
                             unsigned long long *args, int nargs, char *err, int errlen) {
    const Entry *e = nullptr;
    for (const Entry &t : table)
        if (strcmp(t.name, name) == 0) e = &t;
    if (!e) {
        snprintf(err, errlen, "kernel %s is not compiled into the emulator", name);
        return 1;
    }
    if (e->nargs != nargs) {
        snprintf(err, errlen, "kernel %s takes %d arguments, launched with %d", name, e->nargs, nargs);
        return 1;
    }
    int n = bx * by * bz;
    if (n <= 0 || n > 1024) {
        snprintf(err, errlen, "block of %d threads (1..1024 allowed)", n);
        return 1;
    }
    if (shmem > 227 * 1024) {
        snprintf(err, errlen, "%d B of dynamic shared memory (the H200 allows 227 KiB)", shmem);
        return 1;
    }
    std::vector<void *> argv(nargs);
    for (int i = 0; i < nargs; i++) argv[i] = &args[i];
    cur_fn = e->fn;
    cur_args = argv.data();
    std::vector<char> smem(shmem > 0 ? shmem : 1, (char)0xff); // uninitialised shared memory reads as NaN
    st.dyn_smem = smem.data();
    st.kernel = name;
    if ((int)fibers.size() < n) fibers.resize(n);
    while ((int)stacks.size() < n) stacks.push_back((char *)malloc(kStack));
    st.gdim = dim3(gx, gy, gz);
    st.bdim = dim3(bx, by, bz);
    for (int z = 0; z < gz; z++)
        for (int y = 0; y < gy; y++)
            for (int x = 0; x < gx; x++) {
                st.bidx = dim3(x, y, z);
                for (int i = 0; i < n; i++) {
                    Fiber &f = fibers[i];
                    f.tid = dim3(i % bx, (i / bx) % by, i / (bx * by));
                    f.lin = i;
                    f.warp = i / 32;
                    f.lane = i % 32;
                    f.wait = RUN;
                    f.shfl_seq = 0;
                    f.started = false;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = stacks[i];
                    f.ctx.uc_stack.ss_size = kStack;
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, (void (*)())fiber_entry, 0);
                }
                for (;;) {
                    bool ran = false, live = false;
                    for (int i = 0; i < n; i++) {
                        Fiber &f = fibers[i];
                        if (f.wait == RUN) {
                            st.cur = &f;
                            if (!_setjmp(st.sched)) {
                                if (!f.started) {
                                    f.started = true;
                                    swapcontext(&st.sched_ctx, &f.ctx);
                                } else {
                                    _longjmp(f.env, 1);
                                }
                            }
                            ran = true;
                        }
                        if (f.wait != DONE) live = true;
                    }
                    if (!live) break;
                    if (ran) continue;
                    // Everyone waits: release whole warps at a warp barrier,
                    // else the block at __syncthreads.
                    bool released = false;
                    for (int w = 0; w * 32 < n; w++) {
                        int lo = w * 32, hi = min(n, lo + 32);
                        bool all = true, any = false;
                        for (int i = lo; i < hi; i++) {
                            if (fibers[i].wait == WARP) any = true;
                            else if (fibers[i].wait != DONE) all = false;
                        }
                        if (all && any) {
                            for (int i = lo; i < hi; i++)
                                if (fibers[i].wait == WARP) fibers[i].wait = RUN;
                            released = true;
                        }
                    }
                    if (released) continue;
                    bool block = true;
                    for (int i = 0; i < n; i++)
                        if (fibers[i].wait != DONE && fibers[i].wait != BLOCK) block = false;
                    if (block) {
                        for (int i = 0; i < n; i++)
                            if (fibers[i].wait == BLOCK) fibers[i].wait = RUN;
                        continue;
                    }
                    snprintf(err, errlen, "deadlock in block (%d,%d,%d): threads wait at different barriers (a __syncthreads or shuffle in divergent code)", x, y, z);
                    return 1;
                }
            }
    return 0;
}
