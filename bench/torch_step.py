"""One training step of a bmojo preset in the best PyTorch a user could write,
timed beside `bmojo bench step` (issue 18): the PyTorch reference figure.

Usage:
  python3 bench/torch_step.py --preset bmojo-130m --seq-len 2048 --batch-size 8 \
      --steps 10 --warmup 3 [--json [FILE]] [--bmojo-json STEP.json]
  python3 bench/torch_step.py --device cpu --preset tiny --steps 2 --warmup 1 --selftest

The model is docs/model.md (the same math as model/model.go; the byte
vocabulary V = 256): RMSNorm, RoPE, the Mamba-1 selective SSM (causal conv,
SiLU, x_proj, softplus Δ), the B'MOJO attention over context + fading +
eidetic-memory keys (innovation selection), a SwiGLU MLP, the tied head, and
AdamW with global-norm clipping at 1.0, as `bench step` runs it. How it is
written:

- torch.compile on every layer's dense work (projections, conv, scan, MLP);
- FlexAttention (torch.nn.attention.flex_attention) with a block mask: the
  keys are [k | k_f] (2T positions: raw tokens, then the SSM outputs) and the
  mask admits the context window, the fading window and the memory keys
  (selected raw positions, visible δ chunks later, the M newest); the memory
  part depends on the data, so its block mask is rebuilt each step;
- a chunked log-space selective scan: inside a chunk the recurrence is a
  log-cumsum-exp over (signed) terms, every exponential ≤ 1 in size; the
  chunks are chained by the same scan in float64 over the chunk ends; the
  [B,T,E,N] intermediates are recomputed in the backward
  (torch.utils.checkpoint), not stored;
- bf16 autocast for the products, fp32 master weights, SSM state and loss;
- W_gate|W_up as one product; fused AdamW (fused=True) in two decay groups.

Without FlexAttention (torch < 2.5) or torch.compile (< 2.0), as on the CPU
smoke test, it falls back to a dense masked softmax over the same mask and to
eager mode (reported in the output).

FLOPs per token are model.FLOPsPerToken's (model/flops.go), the numerator of
bench step's MFU; MFU here is against --peak-tflops (989, the H100/H200 dense
bf16 peak). With --bmojo-json (bench step's --json file from the same run)
it prints bmojo's figures beside these and the ratio.
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    create_block_mask = flex_attention = None

# ---------------------------------------------------------------------------
# presets and layout (model/config.go Preset, model/params.go NewLayout)

SIZES = {  # d, bmojo, mamba, swa/transformer, hybrid layers; seq_len, window, memory, select
    "tiny": (64, 2, 4, 2, 4, 128, 32, 32, 2),
    "small": (256, 4, 12, 6, 4, 512, 128, 128, 8),
    "130m": (768, 8, 24, 12, 12, 2048, 512, 512, 32),
    "370m": (1024, 16, 48, 24, 20, 2048, 512, 512, 32),
}
FAMILIES = ["bmojo", "bmojo-f", "mamba", "swa", "transformer", "hybrid"]


def preset(name):
    """model.Preset: "family-size" (size defaults to small); "tiny" alone is
    bmojo-tiny."""
    if name in SIZES:
        name = "bmojo-" + name
    family, size = name, "small"
    for s in SIZES:
        if name.endswith("-" + s):
            family, size = name[: -len(s) - 1], s
    if family not in FAMILIES:
        raise SystemExit(f"torch_step.py: unknown preset {name!r} (families {FAMILIES}, sizes {list(SIZES)})")
    d, nb, nm, ns, nh, T, w, mem, sel = SIZES[size]
    dff = (8 * d // 3 + 63) // 64 * 64
    if (8 * d) % 3 != 0 and (8 * d // 3) % 64 == 0:
        dff += 64
    c = dict(V=256, d=d, H=max(1, d // 64), D=64, E=2 * d, N=16, K=4, R=(d + 15) // 16,
             wc=w, wf=w, C=w, S=sel, M=0, lam=0.01, F=dff, theta=10000.0, T=T)
    c["G"] = c["H"]
    if family == "bmojo":
        c["M"], mixers = mem, ["bmojo"] * nb
    elif family == "bmojo-f":
        mixers = ["bmojo"] * nb
    elif family == "mamba":
        c["F"], mixers = 0, ["mamba"] * nm
    elif family == "swa":
        c["wf"], mixers = 0, ["attention"] * ns
    elif family == "transformer":
        c["wc"], c["wf"], c["C"], mixers = T, 0, T, ["attention"] * ns
    else:  # hybrid: one attention layer in every four, the last of each group
        c["wf"], mixers = 0, ["attention" if i % 4 == 3 else "mamba" for i in range(nh)]
    c["mixers"] = mixers
    return c


def delta(c):
    """Memory visibility delay in chunks: 1 + ceil((w_c + w_f)/C)."""
    return 1 + (c["wc"] + c["wf"] + c["C"] - 1) // c["C"]


def layout(c):
    """(name, shape, decay) in model.NewLayout's order."""
    d, E, N, R, K, H, G, D, Fw = (c[k] for k in ("d", "E", "N", "R", "K", "H", "G", "D", "F"))
    out = [("embed.weight", (c["V"], d), False), ("norm_f.weight", (d,), False)]
    for i, m in enumerate(c["mixers"]):
        p = f"layers.{i}."
        out.append((p + "norm1.weight", (d,), False))
        if m in ("bmojo", "mamba"):
            out += [(p + "ssm.in_proj.weight", (2 * E, d), True), (p + "ssm.conv.weight", (E, K), True),
                    (p + "ssm.conv.bias", (E,), False), (p + "ssm.x_proj.weight", (R + 2 * N, E), True),
                    (p + "ssm.dt_proj.weight", (E, R), True), (p + "ssm.dt_proj.bias", (E,), False),
                    (p + "ssm.A_log", (E, N), False), (p + "ssm.D", (E,), False),
                    (p + "ssm.out_proj.weight", (d, E), True)]
        if m in ("bmojo", "attention"):
            out += [(p + "attn.q_proj.weight", (H * D, d), True), (p + "attn.k_proj.weight", (G * D, d), True),
                    (p + "attn.v_proj.weight", (G * D, d), True), (p + "attn.o_proj.weight", (d, H * D), True)]
            if m == "bmojo" and c["M"] > 0:
                out.append((p + "attn.predictor.weight", (d, d), True))
        if Fw > 0:
            # W_gate and W_up stacked: one [2F, d] product (as bmojo runs it).
            out += [(p + "norm2.weight", (d,), False), (p + "mlp.gate_up.weight", (2 * Fw, d), True),
                    (p + "mlp.down_proj.weight", (d, Fw), True)]
    return out


def mean_keys(c, mixer, T):
    """model.meanKeys: the mean number of keys a query attends to."""
    s = 0
    for t in range(T):
        k = min(t + 1, c["wc"])
        if mixer == "bmojo":
            if c["wf"] > 0:
                k += max(0, min(c["wf"], t + 1 - c["wc"]))
            if c["M"] > 0:
                visible = min(T // c["C"], max(0, t // c["C"] - delta(c) + 1))
                k += min(c["M"], visible * c["S"])
        s += k
    return s / T


def flops_per_token(c, T):
    """model.FLOPsPerToken: 6·(linear weights + V·d), with 12· for W_k, W_v
    of a bmojo layer with a fading window and 4· (2· with λ = 0) for the
    predictor, + 12·H·D·(mean keys) per attention layer, + 24·E·N + 6·E·K per
    SSM layer."""
    f = 6.0 * c["V"] * c["d"]
    for name, shape, decay in layout(c):
        if not decay or len(shape) != 2 or name.endswith("conv.weight"):
            continue
        mult = 6.0
        layer = int(name.split(".")[1])
        if name.endswith("attn.predictor.weight"):
            mult = 4.0 if c["lam"] > 0 else 2.0
        elif name.endswith(("attn.k_proj.weight", "attn.v_proj.weight")) and c["mixers"][layer] == "bmojo" and c["wf"] > 0:
            mult = 12.0
        f += mult * math.prod(shape)
    for m in c["mixers"]:
        if m in ("attention", "bmojo"):
            f += 12.0 * c["H"] * c["D"] * mean_keys(c, m, T)
        if m in ("mamba", "bmojo"):
            f += 24.0 * c["E"] * c["N"] + 6.0 * c["E"] * c["K"]
    return f


def init_params(c, device, seed=1):
    """docs/model.md §3, §6: N(0, 0.02), residual outputs scaled by
    1/sqrt(2L), Mamba's conv, dt and A_log initialisation."""
    g = torch.Generator().manual_seed(seed)
    resid = 0.02 / math.sqrt(2 * len(c["mixers"]))
    P = {}
    for name, shape, _ in layout(c):
        if name.endswith(("norm1.weight", "norm2.weight", "norm_f.weight", "ssm.D")):
            w = torch.ones(shape)
        elif name.endswith(("conv.weight", "conv.bias")):
            w = (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(c["K"])
        elif name.endswith("dt_proj.weight"):
            w = (torch.rand(shape, generator=g) * 2 - 1) / math.sqrt(c["R"])
        elif name.endswith("dt_proj.bias"):
            dt = torch.exp(torch.rand(shape, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
            w = dt + torch.log(-torch.expm1(-dt))
        elif name.endswith("A_log"):
            w = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).repeat(shape[0], 1)
        elif name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
            w = torch.randn(shape, generator=g) * resid
        else:
            w = torch.randn(shape, generator=g) * 0.02
        P[name] = torch.nn.Parameter(w.to(device))
    return P


# ---------------------------------------------------------------------------
# the network

def rmsnorm(x, g):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g


def rope_tables(T, D, theta, device):
    i = torch.arange(D // 2, dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-2.0 * i / D)
    return ang.cos().float().to(device), ang.sin().float().to(device)


def rope(x, cos, sin):
    """Rotate-half RoPE at absolute positions; x [B,T,nh,D] -> [B,nh,T,D]."""
    h = x.shape[-1] // 2
    x = x.float()
    x1, x2 = x[..., :h], x[..., h:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).transpose(1, 2)


NEG = -1e30  # the log of "no term" in the log-space scan (exp gives exactly 0)


def _log_scan(S, u, dim):
    """Σ_{s≤t} exp(S_t − S_s)·u_s along dim (S non-increasing: log decays),
    in log space: the positive and negative terms each a logcumsumexp, so no
    exponential overflows whatever the decay."""
    la = torch.log(u.abs().clamp_min(1e-37))
    lp = torch.where(u > 0, la, torch.full_like(la, NEG)) - S
    ln = torch.where(u < 0, la, torch.full_like(la, NEG)) - S
    return torch.exp(S + torch.logcumsumexp(lp, dim)) - torch.exp(S + torch.logcumsumexp(ln, dim))


def selective_scan(x, dlt, A, Bm, Cm, Dskip, z, chunk):
    """Mamba-1: h_t = exp(Δ_t A)·h_{t−1} + Δ_t x_t B_t, y_t = h_t·C_t + D x_t,
    out = y·SiLU(z). x, dlt, z [B,T,E] (float32); A [E,N]; Bm, Cm [B,T,N].
    Chunks of `chunk` steps run in parallel (log-space scan inside each);
    the states at chunk ends are chained by the same scan in float64."""
    Bsz, T, E = x.shape
    N = A.shape[1]
    pad = (-T) % chunk
    if pad:
        x, dlt, Bm, Cm = (F.pad(t, (0, 0, 0, pad)) for t in (x, dlt, Bm, Cm))
    nc = (T + pad) // chunk
    dA = (dlt[..., None] * A).view(Bsz, nc, chunk, E, N)             # log decay per step, ≤ 0
    u = ((dlt * x)[..., None] * Bm[:, :, None, :]).view(Bsz, nc, chunk, E, N)
    S = dA.cumsum(2)                                                 # within the chunk
    h = _log_scan(S, u, 2)                                           # states from a zero start
    if nc > 1:
        ends = S[:, :, -1].double()                                  # each chunk's total decay
        Sc = ends.cumsum(1)
        carry = _log_scan(Sc, h[:, :, -1].double(), 1)               # state at each chunk's end
        prev = torch.cat([torch.zeros_like(carry[:, :1]), carry[:, :-1]], 1).to(h.dtype)
        h = h + torch.exp(S) * prev[:, :, None]
    y = (h * Cm.view(Bsz, nc, chunk, 1, N)).sum(-1).view(Bsz, nc * chunk, E)[:, :T]
    return (y + Dskip * x[:, :T]) * F.silu(z)


def scan_loop(x, dlt, A, Bm, Cm, Dskip, z):
    """The recurrence one step at a time (the --selftest reference)."""
    h = torch.zeros(x.shape[0], x.shape[2], A.shape[1], dtype=x.dtype, device=x.device)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dlt[:, t, :, None] * A) * h + (dlt[:, t] * x[:, t])[..., None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1))
    return (torch.stack(ys, 1) + Dskip * x) * F.silu(z)


def ssm_inputs(u, W, c):
    """in_proj, causal conv + SiLU, x_proj, softplus Δ: the scan's inputs."""
    E, N, R, K = c["E"], c["N"], c["R"], c["K"]
    az = F.linear(u, W["ssm.in_proj.weight"])
    a, z = az[..., :E], az[..., E:]
    a = F.conv1d(F.pad(a.transpose(1, 2), (K - 1, 0)), W["ssm.conv.weight"].unsqueeze(1).to(a.dtype),
                 W["ssm.conv.bias"].to(a.dtype), groups=E).transpose(1, 2)
    a = F.silu(a)
    xdbc = F.linear(a, W["ssm.x_proj.weight"])
    dl, Bm, Cm = xdbc[..., :R], xdbc[..., R:R + N], xdbc[..., R + N:]
    dlt = F.softplus(F.linear(dl, W["ssm.dt_proj.weight"]).float() + W["ssm.dt_proj.bias"])
    return a.float(), dlt, Bm.float(), Cm.float(), z.float()


def scan_recomputed(x, dlt, A, Bm, Cm, Dskip, z, chunk, groups):
    """selective_scan with its [B,T,E,N] intermediates recomputed in the
    backward instead of stored (activation checkpointing), over `groups`
    slices of the channels so that the recomputation's working set is
    1/groups of them at a time."""
    outs = []
    E = x.shape[-1]
    for e0 in range(0, E, -(-E // groups)):
        e1 = min(E, e0 - (-E // groups))
        sl = (x[..., e0:e1].contiguous(), dlt[..., e0:e1].contiguous(), A[e0:e1], Bm, Cm, Dskip[e0:e1], z[..., e0:e1].contiguous())
        outs.append(torch.utils.checkpoint.checkpoint(selective_scan, *sl, chunk, use_reentrant=False))
    return torch.cat(outs, -1)


class Step:
    """The model, its optimizer and one training step on a batch."""

    def __init__(self, c, B, T, device, compile_, attention, scan_chunk, amp=True, scan_groups=4, compile_mode=None):
        self.c, self.B, self.T, self.dev = c, B, T, device
        self.P = init_params(c, device)
        decay = [self.P[n] for n, s, dcy in layout(c) if dcy]
        rest = [self.P[n] for n, s, dcy in layout(c) if not dcy]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
        kw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        self.fused_adamw = device.type == "cuda"
        try:
            self.opt = torch.optim.AdamW(groups, fused=self.fused_adamw, **kw)
        except TypeError:  # torch < 2.0
            self.opt, self.fused_adamw = torch.optim.AdamW(groups, **kw), False
        self.cos, self.sin = rope_tables(T, c["D"], c["theta"], device)
        if compile_:
            # One graph per mixer kind serves every layer (weights are
            # arguments), but each memory layer has its own mask function,
            # so the compiled FlexAttention is specialised once per layer.
            for knob in ("cache_size_limit", "recompile_limit"):
                try:
                    setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
                except (AttributeError, TypeError):
                    pass
        self.amp = torch.bfloat16 if amp else torch.float32
        self.use_amp = amp
        self.scan_chunk = min(scan_chunk, T)
        self.flex = attention == "flex"
        wrap = (lambda f: torch.compile(f, mode=compile_mode)) if compile_ else (lambda f: f)
        self.pre = wrap(self._pre)
        self.mix = wrap(self._mix)
        self.post = wrap(self._post)
        self.head = wrap(self._head)
        self.scan_groups = max(1, min(scan_groups, c["E"]))
        self.scan = wrap(scan_recomputed)
        self.attend = wrap(flex_attention) if self.flex else self._dense_attention
        # A memory layer's mask reads its rank (the selected positions),
        # updated in place each step, so its mask function (and what was
        # compiled around it) stays the same; the attention's backward reads
        # it again, so every layer has its own.
        self.ranks = {}
        self.masks = {}

    # -- attention mask: keys are [raw 0..T-1 | fading 0..T-1] ------------
    def mask_mod(self, mixer, rank=None):
        c, T = self.c, self.T
        wc, wf = c["wc"], c["wf"] if mixer == "bmojo" else 0
        mem = mixer == "bmojo" and c["M"] > 0
        C, S, M, dl, nC = c["C"], c["S"], c["M"], delta(c), T // max(1, c["C"])

        def mod(b, h, q, kv):
            raw = kv < T
            j = torch.where(raw, kv, kv - T)
            ok = raw & (j <= q) & (j > q - wc)
            if wf > 0:
                ok = ok | (~raw & (j <= q - wc) & (j > q - wc - wf))
            if mem:
                # Mem(c(q)): selected positions of chunks ≤ c(q) − δ, the M
                # newest: every complete chunk selects S, in position order.
                r = rank[b, torch.where(raw, j, 0)]
                visible = S * torch.clamp(q // C - dl + 1, 0, nC)
                ok = ok | (raw & (r >= 0) & (j // C <= q // C - dl) & (r >= visible - M))
            return ok
        return mod

    def block_mask(self, mixer, layer):
        """The block mask of a layer: one per mixer kind, but rebuilt every
        step for each memory layer (its selection changes)."""
        c = self.c
        kv = 2 * self.T if mixer == "bmojo" and c["wf"] > 0 else self.T
        dynamic = mixer == "bmojo" and c["M"] > 0
        key = layer if dynamic else mixer
        if key not in self.masks or dynamic:
            mod = self.masks[key][1] if key in self.masks else self.mask_mod(mixer, self.ranks.get(layer))
            if self.flex:
                bm = create_block_mask(mod, self.B if dynamic else None, None, self.T, kv, device=self.dev, _compile=True)
            else:
                ar = lambda n: torch.arange(n, device=self.dev)  # noqa: E731
                bm = mod(ar(self.B)[:, None, None, None], None, ar(self.T)[None, None, :, None], ar(kv)[None, None, None, :])
            self.masks[key] = (bm, mod)
        return self.masks[key][0]

    def _dense_attention(self, q, k, v, block_mask):
        s = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
        s = s.masked_fill(~block_mask, float("-inf"))
        return torch.softmax(s, -1).to(v.dtype) @ v

    # -- the layers ------------------------------------------------------
    def _pre(self, x, W, mixer):
        """RMSNorm and, for SSM mixers, the scan's inputs."""
        u = rmsnorm(x, W["norm1.weight"])
        ssm = None
        if mixer != "attention":
            with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.use_amp):
                ssm = ssm_inputs(u, W, self.c)
        return u, ssm

    def _mix(self, u, f, W, mixer):
        """q, k, v (with the fading keys from f), RoPE; the innovation."""
        c, B, T = self.c, self.B, self.T
        H, G, D = c["H"], c["G"], c["D"]
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.use_amp):
            q = F.linear(u, W["attn.q_proj.weight"])
            if f is not None and c["wf"] > 0:  # k|kf, v|vf: one product each over 2BT rows
                uf = torch.cat([u.to(self.amp), f.to(self.amp)], 0)
                kk, vv = F.linear(uf, W["attn.k_proj.weight"]), F.linear(uf, W["attn.v_proj.weight"])
                k, kf, v, vf = kk[:B], kk[B:], vv[:B], vv[B:]
            else:
                k, v = F.linear(u, W["attn.k_proj.weight"]), F.linear(u, W["attn.v_proj.weight"])
                kf = vf = None
            e = None
            if mixer == "bmojo" and c["M"] > 0:
                fd = f.detach()
                pin = torch.cat([torch.zeros_like(fd[:, :1]), fd[:, :-1]], 1)
                pred = F.linear(pin, W["attn.predictor.weight"]).float()
                e = (u.detach().float() - pred).pow(2).mean(-1)          # [B,T]
        qr = rope(q.view(B, T, H, D), self.cos, self.sin)
        keys, vals = [rope(k.view(B, T, G, D), self.cos, self.sin)], [v.view(B, T, G, D).transpose(1, 2)]
        if kf is not None:
            keys.append(rope(kf.view(B, T, G, D), self.cos, self.sin))
            vals.append(vf.view(B, T, G, D).transpose(1, 2))
        K_, V_ = torch.cat(keys, 2), torch.cat(vals, 2)
        if G < H:
            K_, V_ = K_.repeat_interleave(H // G, 1), V_.repeat_interleave(H // G, 1)
        return qr.to(self.amp), K_.to(self.amp), V_.to(self.amp), e

    def _post(self, x, o, f, W, mixer):
        """W_o and the residual (or the SSM output for mamba), then the MLP."""
        c = self.c
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.use_amp):
            if mixer == "mamba":
                x = x + f.float()
            else:
                B, H, T, D = o.shape
                x = x + F.linear(o.transpose(1, 2).reshape(B, T, H * D), W["attn.o_proj.weight"]).float()
            if c["F"] > 0:
                h = rmsnorm(x, W["norm2.weight"])
                g, up = F.linear(h, W["mlp.gate_up.weight"]).chunk(2, -1)
                x = x + F.linear(F.silu(g) * up, W["mlp.down_proj.weight"]).float()
        return x

    def _head(self, x, emb, g, targets):
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.use_amp):
            logits = F.linear(rmsnorm(x, g), emb)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)

    def select(self, e, rank):
        """Innovation selection: the S largest e of each complete chunk
        (ties: torch.topk's choice), written into rank (position order)."""
        c, B, T = self.c, self.B, self.T
        C, S = c["C"], c["S"]
        nC = T // C
        with torch.no_grad():
            top = e[:, : nC * C].view(B, nC, C).topk(S, -1).indices.sort(-1).values
            pos = top + (torch.arange(nC, device=e.device) * C)[None, :, None]
            rank.fill_(-1)
            rank.scatter_(1, pos.view(B, -1), torch.arange(nC * S, device=e.device, dtype=torch.int32).expand(B, -1).contiguous())

    def loss(self, tokens, targets):
        c, P = self.c, self.P
        x = P["embed.weight"][tokens]
        aux = 0.0
        for i, mixer in enumerate(c["mixers"]):
            p = f"layers.{i}."
            W = {k[len(p):]: v for k, v in P.items() if k.startswith(p)}  # the same names in every layer
            u, ssm = self.pre(x, W, mixer)
            f = None
            if ssm is not None:
                a, dlt, Bm, Cm, z = ssm
                A = -torch.exp(W["ssm.A_log"])
                s = self.scan(a, dlt, A, Bm, Cm, W["ssm.D"], z, self.scan_chunk, self.scan_groups)
                with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.use_amp):
                    f = F.linear(s, W["ssm.out_proj.weight"])
            o = None
            if mixer != "mamba":
                qr, kr, vv, e = self.mix(u, f, W, mixer)
                if e is not None:
                    aux = aux + e.mean()
                    if i not in self.ranks:
                        self.ranks[i] = torch.full((self.B, self.T), -1, dtype=torch.int32, device=self.dev)
                    self.select(e, self.ranks[i])
                o = self.attend(qr, kr, vv, block_mask=self.block_mask(mixer, i))
            x = self.post(x, o, f, W, mixer)
        return self.head(x, P["embed.weight"], P["norm_f.weight"], targets) + c["lam"] * aux

    def step(self, tokens, targets):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.P.values(), 1.0)
        self.opt.step()
        return loss


# ---------------------------------------------------------------------------

def selftest(dev):
    """The chunked log-space scan against the step-by-step recurrence, and the
    attention mask against docs/model.md §4's key sets, on small inputs."""
    g = torch.Generator().manual_seed(3)
    B, T, E, N = 2, 45, 5, 4
    x, z = torch.randn(B, T, E, generator=g, dtype=torch.float64), torch.randn(B, T, E, generator=g, dtype=torch.float64)
    dlt = F.softplus(torch.randn(B, T, E, generator=g, dtype=torch.float64) * 2)
    A = -torch.exp(torch.randn(E, N, generator=g, dtype=torch.float64) + 1.5)
    Bm, Cm = torch.randn(B, T, N, generator=g, dtype=torch.float64), torch.randn(B, T, N, generator=g, dtype=torch.float64)
    Dk = torch.randn(E, generator=g, dtype=torch.float64)
    want = scan_loop(x, dlt, A, Bm, Cm, Dk, z)
    worst = 0.0
    for chunk in (1, 4, 8, 64):
        got = selective_scan(x, dlt, A, Bm, Cm, Dk, z, chunk)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    ok = worst < 1e-9
    print(f"selftest: chunked log-space scan vs the recurrence (float64, chunks 1/4/8/64): rel err {worst:.2e} {'ok' if ok else 'FAIL'}")
    # The mask against the key sets, written out position by position.
    c = preset("bmojo-tiny")
    c.update(C=8, S=2, M=3, wc=4, wf=3)
    T = 48
    st = Step.__new__(Step)
    st.c, st.T, st.B, st.dev = c, T, 1, torch.device("cpu")
    rank = torch.full((1, T), -1, dtype=torch.int32)
    sel = sorted(p for ch in range(T // 8) for p in (ch * 8 + 1, ch * 8 + 6))
    for r, pos in enumerate(sel):
        rank[0, pos] = r
    ar = torch.arange
    mask = st.mask_mod("bmojo", rank)(ar(1)[:, None, None, None], None, ar(T)[None, None, :, None], ar(2 * T)[None, None, None, :])[0, 0]
    bad = 0
    for t in range(T):
        want = {j for j in range(max(0, t - 3), t + 1)}
        want |= {T + j for j in range(max(0, t - 4 - 3 + 1), t - 4 + 1)}
        vis = [p for p in sel if p // 8 <= t // 8 - delta(c)]
        want |= set(vis[-3:])
        got = set(torch.nonzero(mask[t]).flatten().tolist())
        bad += got != want
    print(f"selftest: attention mask vs docs/model.md §4 key sets: {bad} rows differ {'ok' if bad == 0 else 'FAIL'}")
    return ok and bad == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="bmojo-130m")
    ap.add_argument("--seq-len", type=int, default=0, help="default: the preset's")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="MFU's denominator (H100/H200 dense bf16)")
    ap.add_argument("--no-compile", action="store_true", help="eager mode")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    ap.add_argument("--attention", choices=["flex", "dense"], default="flex" if flex_attention else "dense")
    ap.add_argument("--scan-chunk", type=int, default=64, help="time steps per chunk of the scan")
    ap.add_argument("--scan-groups", type=int, default=4, help="channel groups the scan is recomputed in (memory)")
    ap.add_argument("--no-amp", action="store_true", help="float32 products (checks against the Go model)")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="print the figures as JSON (or write them to FILE)")
    ap.add_argument("--bmojo-json", help="bench step's --json of the same run: print bmojo's figures and the ratio")
    ap.add_argument("--selftest", action="store_true", help="check the scan and the mask first")
    args = ap.parse_args()

    dev = torch.device(args.device)
    if args.selftest and not selftest(dev):
        return 1
    c = preset(args.preset)
    T = args.seq_len or c["T"]
    if c["M"] > 0 and T % c["C"]:
        raise SystemExit(f"torch_step.py: chunk {c['C']} does not divide --seq-len {T}")
    if args.attention == "flex" and flex_attention is None:
        raise SystemExit("torch_step.py: this torch has no FlexAttention (2.5+); use --attention dense")
    compile_ = not args.no_compile and hasattr(torch, "compile")
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, c["V"], (args.batch_size, T), generator=g).to(dev)
    targets = torch.randint(0, c["V"], (args.batch_size, T), generator=g).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fallback = None
    t0 = time.perf_counter()
    try:
        st = Step(c, args.batch_size, T, dev, compile_, args.attention, args.scan_chunk, amp=not args.no_amp, scan_groups=args.scan_groups,
                  compile_mode=args.compile_mode)
        for _ in range(args.warmup):
            loss = st.step(tokens, targets)
        sync()
    except Exception as e:  # noqa: BLE001 - a compiler failure should still give a (flagged) figure
        if not compile_ or isinstance(e, torch.cuda.OutOfMemoryError if dev.type == "cuda" else ()):
            raise
        fallback = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"torch_step.py: torch.compile failed ({fallback}); timing eager mode instead", file=sys.stderr)
        compile_, st = False, None
        torch._dynamo.reset()
        st = Step(c, args.batch_size, T, dev, False, args.attention, args.scan_chunk, amp=not args.no_amp, scan_groups=args.scan_groups)
        for _ in range(args.warmup):
            loss = st.step(tokens, targets)
        sync()
    warm_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = st.step(tokens, targets)
    sync()
    sec = (time.perf_counter() - t0) / max(1, args.steps)
    params = sum(p.numel() for p in st.P.values())
    fpt = flops_per_token(c, T)
    tps = args.batch_size * T / sec
    r = {
        "preset": args.preset, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "compiled": compile_, "attention": args.attention, "fused_adamw": st.fused_adamw,
        "scan_chunk": st.scan_chunk, "params": params, "batch": args.batch_size, "seq_len": T,
        "step_seconds": sec, "step_ms": 1e3 * sec, "tokens_per_s": tps, "flops_per_token": fpt,
        "achieved_tflops": fpt * tps / 1e12, "peak_tflops": args.peak_tflops, "mfu": fpt * tps / 1e12 / args.peak_tflops,
        "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0,
        "warmup_seconds": warm_s, "final_loss": float(loss), "scan_groups": st.scan_groups,
    }
    if fallback:
        r["compile_failed"] = fallback
    print(f"torch {torch.__version__} on {r['device']}: preset {args.preset}, {params} parameters, batch {args.batch_size} × {T}, "
          f"{'torch.compile' if compile_ else 'eager'}{' (compile FAILED: ' + fallback + ')' if fallback else ''}, "
          f"{args.attention} attention, scan chunk {st.scan_chunk} × {st.scan_groups} channel groups, "
          f"{'fused' if st.fused_adamw else 'unfused'} AdamW")
    print(f"step {r['step_ms']:.1f} ms, {tps:.0f} tokens/s, {fpt:.3g} model FLOPs/token, {r['achieved_tflops']:.1f} TFLOP/s, "
          f"MFU {100 * r['mfu']:.1f}% of {args.peak_tflops:g}, peak memory {r['peak_mem_gib']:.2f} GiB, loss {r['final_loss']:.3f}")
    if args.bmojo_json:
        with open(args.bmojo_json) as fh:
            b = json.load(fh)
        ratio = b["tokens_per_s"] / tps
        bmfu = b["flops_per_token"] * b["tokens_per_s"] / 1e12 / args.peak_tflops
        r.update(bmojo_tokens_per_s=b["tokens_per_s"], bmojo_step_ms=1e3 * b["step_seconds"], bmojo_mfu=bmfu, ratio=ratio)
        print(f"bmojo: step {r['bmojo_step_ms']:.1f} ms, {b['tokens_per_s']:.0f} tokens/s, MFU {100 * bmfu:.1f}% of {args.peak_tflops:g}; "
              f"bmojo / torch = {ratio:.2f}x")
    if args.json == "-":
        print(json.dumps(r))
    elif args.json:
        with open(args.json, "w") as fh:
            json.dump(r, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
