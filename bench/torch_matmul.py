"""torch.matmul on the shapes `bmojo bench kernels --json` measured, in the same run.

Usage: python3 bench/torch_matmul.py KERNELS.json [--peak]
For every "MatMul*" row (shape Rw×N×K) it times torch in bf16 (x[Rw,K] @ w[N,K].T,
and for the backward the two products dx = dout @ w and dw = dout.T @ x), prints
bmojo's TFLOP/s beside torch's and the ratio. --peak also prints torch's bf16 rate
on 8192³, the reference for MFU (`PEAK_TFLOPS=...` on the last line).
"""
import json
import sys
import time

import torch


def bench(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rows = json.load(open(sys.argv[1]))
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'op':<34} {'shape':<20} {'bmojo TFLOP/s':>14} {'torch TFLOP/s':>14} {'ratio':>7}")
    worst = None
    for r in rows:
        if not r["op"].startswith("MatMul"):
            continue
        Rw, N, K = (int(v) for v in r["shape"].split("×"))
        x = torch.randn(Rw, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        if r["op"].startswith("MatMulBackward"):
            dout = torch.randn(Rw, N, device=dev, dtype=torch.bfloat16)
            t = bench(lambda: (dout @ w, dout.t() @ x))
            flops = 4 * Rw * N * K
        else:
            t = bench(lambda: x @ w.t())
            flops = 2 * Rw * N * K
        tt = flops / t / 1e12
        ratio = r["tflops"] / tt
        worst = ratio if worst is None else min(worst, ratio)
        print(f"{r['op']:<34} {r['shape']:<20} {r['tflops']:>14.1f} {tt:>14.1f} {ratio:>6.2f}x")
    if worst is not None:
        print(f"worst ratio bmojo/torch over the matrix products: {worst:.2f}")
    if "--peak" in sys.argv:
        n = 8192
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        t = bench(lambda: a @ b, reps=30)
        print(f"PEAK_TFLOPS={2 * n**3 / t / 1e12:.1f}")


if __name__ == "__main__":
    main()
