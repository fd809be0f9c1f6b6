"""torch.matmul on the shapes `bmojo bench kernels --json` measured, in the same run.

Usage: python3 bench/torch_matmul.py KERNELS.json [--peak]
For every "MatMul*" row (shape Rw×N×K) it times torch in bf16 (x[Rw,K] @ w[N,K].T,
and for the backward the two products dx = dout @ w and dw = dout.T @ x), prints
bmojo's TFLOP/s beside torch's and the ratio. That reference keeps its tensors in
bf16. bmojo's op reads float32 tensors and multiplies bf16 copies of them: rows
without a suffix read the copies bmojo keeps of weights and saved activations (a
backward still converts its fresh dout), rows marked "+conv" convert every input
in every call. The second reference has bmojo's semantics: float32 tensors with
torch.set_float32_matmul_precision("medium") (bf16 inside the product).
--peak also prints torch's bf16 rate on 8192³, the reference for MFU
(`PEAK_TFLOPS=...` on the last line).
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
    print(f"{'op':<34} {'shape':<20} {'bmojo TFLOP/s':>14} {'torch bf16':>11} {'ratio':>7} {'torch fp32/medium':>18} {'ratio':>7}")
    worst, worst32 = {}, {}
    for r in rows:
        if not r["op"].startswith("MatMul"):
            continue
        Rw, N, K = (int(v) for v in r["shape"].split("×"))
        rates = []
        for dtype in (torch.bfloat16, torch.float32):
            torch.set_float32_matmul_precision("medium" if dtype == torch.float32 else "highest")
            x = torch.randn(Rw, K, device=dev, dtype=dtype)
            w = torch.randn(N, K, device=dev, dtype=dtype)
            if r["op"].startswith("MatMulBackward"):
                dout = torch.randn(Rw, N, device=dev, dtype=dtype)
                t = bench(lambda: (dout @ w, dout.t() @ x))
                flops = 4 * Rw * N * K
            else:
                t = bench(lambda: x @ w.t())
                flops = 2 * Rw * N * K
            rates.append(flops / t / 1e12)
        torch.set_float32_matmul_precision("highest")
        ratio, ratio32 = r["tflops"] / rates[0], r["tflops"] / rates[1]
        group = "converting every input" if r["op"].endswith("+conv") else "kept bf16 copies"
        worst[group] = min(worst.get(group, ratio), ratio)
        worst32[group] = min(worst32.get(group, ratio32), ratio32)
        print(f"{r['op']:<34} {r['shape']:<20} {r['tflops']:>14.1f} {rates[0]:>11.1f} {ratio:>6.2f}x {rates[1]:>18.1f} {ratio32:>6.2f}x")
    for group in worst:
        print(f"worst ratio bmojo/torch over the matrix products ({group}): {worst[group]:.2f} (bf16 tensors), {worst32[group]:.2f} (fp32 tensors, medium precision)")
    if "--peak" in sys.argv:
        n = 8192
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        t = bench(lambda: a @ b, reps=30)
        print(f"PEAK_TFLOPS={2 * n**3 / t / 1e12:.1f}")


if __name__ == "__main__":
    main()
