"""torch.matmul on the shapes `bmojo bench kernels --json` measured, in the same run.

Usage: python3 bench/torch_matmul.py KERNELS.json [--peak]
For every "MatMul*" row (shape Rw×N×K) it times torch in bf16 (x[Rw,K] @ w[N,K].T,
and for the backward the two products dx = dout @ w and dw = dout.T @ x), prints
bmojo's TFLOP/s beside torch's and the ratio. That reference keeps its tensors in
bf16. bmojo's op reads float32 tensors and multiplies bf16 copies of them: rows
without a suffix read the copies bmojo keeps of weights and saved activations (a
backward still converts its fresh dout), rows marked "+conv" convert every input
in every call. The second reference is the same bf16 product with float32
outputs (torch.mm / torch.addmm with out_dtype=float32, the backward accumulating
into float32 gradients; rows marked "(dx written)" overwrite dx, as the training
step does for those products), which is what bmojo's op computes from its copies. The
third has bmojo's whole semantics: float32 tensors with
torch.set_float32_matmul_precision("medium") (bf16 inside the product).
Rows marked "(not in the step)" are products the training step does not run as
such (x_proj's backward adding its dx: the step computes that dx inside the
SiLU's backward, SiLUMatMulBackward); they are printed and left out of the worst
ratios. The row "(as in the step ...)" stands for them: the weight gradient's
product plus the time the dx product adds to the SiLU's backward.
--peak also prints torch's bf16 rate on 8192³, the reference for MFU
(`PEAK_TFLOPS=...` on the last line).
"""
import json
import sys
import time

import torch


def bench(fn, reps=20, span=0.025):
    """Seconds per call, as bmojo bench kernels times its ops: two calls, about
    25 ms of calls untimed (clocks rise), then at least reps calls and 25 ms."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    n = max(reps, int(span / max(time.perf_counter() - t0, 1e-6)))
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rows = json.load(open(sys.argv[1]))
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'op':<47} {'shape':<20} {'bmojo TFLOP/s':>14} {'torch bf16':>11} {'ratio':>7} "
          f"{'torch bf16→fp32':>16} {'ratio':>7} {'torch fp32/medium':>18} {'ratio':>7}")
    refs = ("bf16 tensors", "bf16 inputs, fp32 outputs", "fp32 tensors, medium precision")
    worst = {}
    for r in rows:
        if not r["op"].startswith("MatMul"):
            continue
        Rw, N, K = (int(v) for v in r["shape"].split("×"))
        backward = r["op"].startswith("MatMulBackward")
        flops = (4 if backward else 2) * Rw * N * K
        rates = []
        for ref in refs:
            dtype = torch.float32 if ref.startswith("fp32") else torch.bfloat16
            torch.set_float32_matmul_precision("medium" if dtype == torch.float32 else "highest")
            x = torch.randn(Rw, K, device=dev, dtype=dtype)
            w = torch.randn(N, K, device=dev, dtype=dtype)
            dout = torch.randn(Rw, N, device=dev, dtype=dtype)
            if ref == "bf16 inputs, fp32 outputs":
                # bmojo's op: bf16 products into float32 outputs, the
                # backward accumulating into float32 gradients.
                dx = torch.zeros(Rw, K, device=dev)
                dw = torch.zeros(N, K, device=dev)
                f32 = torch.float32
                if backward and "(dx written)" in r["op"]:  # dx overwritten, as bmojo's row does
                    fn = lambda: (torch.mm(dout, w, out_dtype=f32), torch.addmm(dw, dout.t(), x, out_dtype=f32))
                elif backward:
                    fn = lambda: (torch.addmm(dx, dout, w, out_dtype=f32), torch.addmm(dw, dout.t(), x, out_dtype=f32))
                else:
                    fn = lambda: torch.mm(x, w.t(), out_dtype=f32)
            elif backward:
                fn = lambda: (dout @ w, dout.t() @ x)
            else:
                fn = lambda: x @ w.t()
            try:
                rates.append(flops / bench(fn) / 1e12)
            except (TypeError, RuntimeError) as e:  # out_dtype needs torch >= 2.8
                print(f"  ({ref}: {e})")
                rates.append(float("nan"))
        torch.set_float32_matmul_precision("highest")
        group = "converting every input" if r["op"].endswith("+conv") else "kept bf16 copies"
        if "(not in the step)" in r["op"]:
            group = None  # printed, left out of the worst ratios
        cols = ""
        for ref, rate in zip(refs, rates):
            ratio = r["tflops"] / rate
            if ratio == ratio and group:  # not NaN
                worst[(group, ref)] = min(worst.get((group, ref), ratio), ratio)
            cols += f" {rate:>{16 if ref.startswith('bf16 in') else 11 if ref.startswith('bf16') else 18}.1f} {ratio:>6.2f}x"
        print(f"{r['op']:<47} {r['shape']:<20} {r['tflops']:>14.1f}{cols}")
    for (group, ref), w in worst.items():
        print(f"worst ratio bmojo/torch over the matrix products ({group}) against torch on {ref}: {w:.2f}")
    if "--peak" in sys.argv:
        n = 8192
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        t = bench(lambda: a @ b, reps=30)
        print(f"PEAK_TFLOPS={2 * n**3 / t / 1e12:.1f}")


if __name__ == "__main__":
    main()
