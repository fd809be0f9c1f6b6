#!/usr/bin/env python3
"""PyTorch reference of the B'MOJO model (docs/model.md), checked
against a golden file written by the Go trainer (tools/torchref/dump).

The golden file is one safetensors file holding the initial parameters
(param.NAME), the gradients of the first batch (grad.NAME), tokens/targets,
logits, the three loss scalars, the batches and loss curve of a few AdamW
steps, and in its metadata the model config (JSON, key "config") and the
optimizer settings (JSON, key "optim"). This script rebuilds the network from
docs/model.md alone -- plain PyTorch autograd, float64 on the CPU by default --
recomputes logits, losses and every gradient at the Go initial weights,
replays the same optimizer steps with its own AdamW, and compares:

  logits            max abs error <= 2e-2                  (docs/model.md section 5)
  loss_ce/aux/total relative error <= 1e-3
  grad.NAME         cosine similarity >= 0.999 (max abs and max-abs/max|ref|
                    errors are reported, not gated)
  curve[s]          loss of optimizer step s, relative error <= 1e-3
  curve.lr          the warm-up + cosine schedule, relative error <= 1e-9
  curve.grad_norm[0] global gradient norm before clipping, rel. error <= 1e-3
  innovation, select  the eidetic innovation and top-k selection (near-ties
                    below float32 resolution follow the Go choice)
  layout, decay     tensor names/shapes of docs/model.md section 7 and the
                    weight-decay groups of section 6

--strict tightens these for an fp32 CPU golden (see STRICT below).

Usage: bmojo_ref.py GOLDEN.safetensors [--device cpu|cuda] [--dtype float64|float32] [--strict]
Exit status: 0 all checks pass, 1 some check failed, 2 unusable input
(missing or garbled file, missing tensor, torch not installed).

Only torch is needed: safetensors is parsed here with json + struct.
"""

import argparse
import json
import math
import os
import struct
import sys
import time

FORMAT = "bmojo-torchref/1"


class InputError(Exception):
    """The golden file is missing, garbled or incomplete."""


try:
    import torch
    import torch.nn.functional as F
except ImportError as e:  # pragma: no cover - depends on the machine
    print(f"bmojo_ref.py: PyTorch is not installed ({e}); install torch to run the reference check", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------
# safetensors

_DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}

MAX_HEADER = 100 << 20


def load_safetensors(path):
    """Returns (tensors, metadata) of a safetensors file; raises InputError
    with the file name and the reason on any malformation."""
    if sys.byteorder != "little":
        raise InputError("this parser assumes a little-endian host")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) < 8:
        raise InputError(f"{path}: {len(raw)} bytes, shorter than the 8-byte header length (not a safetensors file)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER:
        raise InputError(f"{path}: header length {n} exceeds {MAX_HEADER} bytes (not a safetensors file, or corrupt)")
    if n > len(raw) - 8:
        raise InputError(f"{path}: header length {n} but only {len(raw) - 8} bytes follow (truncated)")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise InputError(f"{path}: __metadata__ must map strings to strings")
    data = bytearray(raw[8 + n:])
    tensors = {}
    for name, e in header.items():
        if not isinstance(e, dict):
            raise InputError(f"{path}: tensor {name!r}: header entry is not an object")
        dt = e.get("dtype")
        if dt not in _DTYPES:
            raise InputError(f"{path}: tensor {name!r}: unsupported dtype {dt!r}")
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise InputError(f"{path}: tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise InputError(f"{path}: tensor {name!r}: bad data_offsets {offs!r}")
        if offs[1] > len(data):
            raise InputError(f"{path}: tensor {name!r}: data ends at byte {offs[1]} but the file has {len(data)} data bytes (truncated)")
        tdt, size = _DTYPES[dt]
        numel = math.prod(shape)
        if numel * size != offs[1] - offs[0]:
            raise InputError(f"{path}: tensor {name!r}: shape {shape} of {dt} needs {numel * size} bytes, "
                             f"data_offsets span {offs[1] - offs[0]}")
        if numel == 0:
            t = torch.zeros(shape, dtype=tdt)
        else:
            t = torch.frombuffer(data, dtype=tdt, count=numel, offset=offs[0]).clone().reshape(shape)
        tensors[name] = t
    return tensors, meta


# ---------------------------------------------------------------------------
# config, layout (docs/model.md sections 1 and 7)

class Config:
    def __init__(self, js):
        need = ["vocab_size", "d_model", "n_layer", "mixers", "seq_len"]
        for k in need:
            if k not in js:
                raise InputError(f"config metadata lacks {k!r}")
        g = lambda k, d=0: js.get(k, d)  # noqa: E731
        self.V, self.d, self.L = g("vocab_size"), g("d_model"), g("n_layer")
        self.H, self.G, self.D = g("n_head"), g("n_kv_head"), g("head_dim")
        self.E, self.N, self.K, self.R = g("d_inner"), g("d_state"), g("d_conv"), g("dt_rank")
        self.wc, self.wf, self.C = g("window"), g("fading_window"), g("chunk")
        self.k_sel, self.M = g("select_per_chunk"), g("memory")
        self.lam = float(g("innovation_loss", 0.0))
        self.Fff = g("d_ff")
        self.theta = float(g("rope_theta", 10000.0))
        self.memory_rope = g("memory_rope", "absolute")
        self.mixers = list(g("mixers"))
        self.T = g("seq_len")
        if len(self.mixers) != self.L:
            raise InputError(f"config: {len(self.mixers)} mixers for n_layer {self.L}")
        for m in self.mixers:
            if m not in ("bmojo", "mamba", "attention"):
                raise InputError(f"config: unknown mixer {m!r}")

    def delta(self):
        """Memory visibility delay: 1 + ceil((w_c + w_f) / C)."""
        return 1 + -(-(self.wc + self.wf) // self.C)

    def has_memory(self):
        return self.M > 0


def expected_layout(c):
    """docs/model.md section 7: name -> shape, in order."""
    out = {"embed.weight": [c.V, c.d], "norm_f.weight": [c.d]}
    for i, m in enumerate(c.mixers):
        p = f"layers.{i}."
        out[p + "norm1.weight"] = [c.d]
        if m in ("bmojo", "mamba"):
            out.update({
                p + "ssm.in_proj.weight": [2 * c.E, c.d],
                p + "ssm.conv.weight": [c.E, c.K],
                p + "ssm.conv.bias": [c.E],
                p + "ssm.x_proj.weight": [c.R + 2 * c.N, c.E],
                p + "ssm.dt_proj.weight": [c.E, c.R],
                p + "ssm.dt_proj.bias": [c.E],
                p + "ssm.A_log": [c.E, c.N],
                p + "ssm.D": [c.E],
                p + "ssm.out_proj.weight": [c.d, c.E],
            })
        if m in ("bmojo", "attention"):
            out.update({
                p + "attn.q_proj.weight": [c.H * c.D, c.d],
                p + "attn.k_proj.weight": [c.G * c.D, c.d],
                p + "attn.v_proj.weight": [c.G * c.D, c.d],
                p + "attn.o_proj.weight": [c.d, c.H * c.D],
            })
            if m == "bmojo" and c.has_memory():
                out[p + "attn.predictor.weight"] = [c.d, c.d]
        if c.Fff > 0:
            out.update({
                p + "norm2.weight": [c.d],
                p + "mlp.gate_proj.weight": [c.Fff, c.d],
                p + "mlp.up_proj.weight": [c.Fff, c.d],
                p + "mlp.down_proj.weight": [c.d, c.Fff],
            })
    return out


def decays(name, shape):
    """docs/model.md section 6: weight decay on matrices only, not on norms,
    biases, embeddings, A_log, D."""
    return len(shape) == 2 and name != "embed.weight" and not name.endswith(".A_log")


# ---------------------------------------------------------------------------
# the network (docs/model.md sections 2-4)

def rmsnorm(x, g):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g


def linear(x, w):
    return x @ w.t()  # PyTorch layout: w is out x in


def silu(x):
    return x * torch.sigmoid(x)


def rope(x, theta):
    """Rotate-half RoPE at absolute positions; x [B,T,nh,D]."""
    B, T, nh, D = x.shape
    h = D // 2
    i = torch.arange(h, dtype=torch.float64)
    freq = theta ** (-2.0 * i / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]  # [T,h]
    cos = ang.cos().to(device=x.device, dtype=x.dtype)[None, :, None, :]
    sin = ang.sin().to(device=x.device, dtype=x.dtype)[None, :, None, :]
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


SCAN_CHUNK = 4  # steps per chunk of selective_scan; run() sets it from --scan-chunk


def selective_scan(a, delta, A, Bm, Cm, Dskip, chunk=None):
    """h_t = exp(delta_t * A) h_{t-1} + (delta_t a_t) (x) B_t;  s_t = h_t C_t + D a_t.
    a, delta: [B,T,E]; A: [E,N]; Bm, Cm: [B,T,N]. Returns s [B,T,E].

    Exact chunked form of the recurrence (a Python loop over t is the
    specification; scan_loop below, and --selftest compares the two): within
    a chunk of L steps, with S_t = sum_{r<=t} delta_r A (cumulative inside the
    chunk), h_t = exp(S_t) h_start + sum_{s<=t} exp(S_t - S_s) delta_s a_s B_s.
    S_t - S_s <= 0 for s <= t, so every exponential is in (0, 1]."""
    chunk = chunk or SCAN_CHUNK
    Bsz, T, E = a.shape
    N = A.shape[1]
    h = torch.zeros(Bsz, E, N, dtype=a.dtype, device=a.device)
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        dl = delta[:, t0:t1]                                  # [B,L,E]
        S = torch.cumsum(dl[..., None] * A, dim=1)            # [B,L,E,N]
        u = (dl * a[:, t0:t1])[..., None] * Bm[:, t0:t1, None, :]  # [B,L,E,N]
        L = t1 - t0
        tri = torch.ones(L, L, dtype=torch.bool, device=a.device).tril()  # [t,s]: s <= t
        diff = S[:, :, None] - S[:, None, :]                  # [B,t,s,E,N]
        diff = diff.masked_fill(~tri[None, :, :, None, None], float("-inf"))
        hs = torch.exp(S) * h[:, None] + (torch.exp(diff) * u[:, None]).sum(2)  # [B,L,E,N]
        outs.append((hs * Cm[:, t0:t1, None, :]).sum(-1))
        h = hs[:, -1]
    return torch.cat(outs, dim=1) + Dskip * a


def scan_loop(a, delta, A, Bm, Cm, Dskip):
    """The recurrence of docs/model.md section 3, one step at a time."""
    Bsz, T, E = a.shape
    h = torch.zeros(Bsz, E, A.shape[1], dtype=a.dtype, device=a.device)
    ys = []
    for t in range(T):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * a[:, t])[..., None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1) + Dskip * a


def ssm(u, P, p, c, scan=selective_scan):
    """Mamba-1 fading memory (docs/model.md section 3). u [B,T,d] -> f [B,T,d]."""
    E, N, R, K = c.E, c.N, c.R, c.K
    w_in = P[p + "ssm.in_proj.weight"]
    a, z = linear(u, w_in[:E]), linear(u, w_in[E:])
    # causal depthwise conv, zero left padding:
    # a'_t[c] = sum_k w[c,k] a_{t-K+1+k}[c] + bias[c]
    xp = F.pad(a.transpose(1, 2), (K - 1, 0))
    a = F.conv1d(xp, P[p + "ssm.conv.weight"].unsqueeze(1), P[p + "ssm.conv.bias"], groups=E).transpose(1, 2)
    a = silu(a)
    xdbc = linear(a, P[p + "ssm.x_proj.weight"])
    dl, Bm, Cm = xdbc[..., :R], xdbc[..., R:R + N], xdbc[..., R + N:]
    delta = F.softplus(linear(dl, P[p + "ssm.dt_proj.weight"]) + P[p + "ssm.dt_proj.bias"])
    A = -torch.exp(P[p + "ssm.A_log"])
    s = scan(a, delta, A, Bm, Cm, P[p + "ssm.D"])
    return linear(s * silu(z), P[p + "ssm.out_proj.weight"])


def select_chunks(e, C, k):
    """Per sequence, per complete chunk: the k positions with the largest
    innovation, ties to the later position, ascending. e [B,T] (no grad).
    Returns (sel[b][chunk] = [positions], smallest gap between the k-th and
    (k+1)-th largest innovation of any chunk, relative to the values)."""
    Bsz, T = e.shape
    nC = T // C
    rows = e.detach().double().cpu().tolist()
    sel, gap = [], math.inf
    for b in range(Bsz):
        per = []
        for ch in range(nC):
            vals = rows[b][ch * C:(ch + 1) * C]
            order = sorted(range(C), key=lambda i: (-vals[i], -i))
            per.append(sorted(ch * C + i for i in order[:k]))
            if k < C:
                vk, vk1 = vals[order[k - 1]], vals[order[k]]
                gap = min(gap, abs(vk - vk1) / max(abs(vk), 1e-30))
        sel.append(per)
    return sel, gap


def memory_mask(sel, c, T, device):
    """[B,T(query),T(key)] bool: key j is in Mem(c(t)), the M most recent
    selected positions among chunks <= c(t) - delta (docs/model.md section 4)."""
    Bsz = len(sel)
    nC, dl = T // c.C, c.delta()
    mask = torch.zeros(Bsz, T, T, dtype=torch.bool)
    for b in range(Bsz):
        for cq in range(-(-T // c.C)):
            visible = [j for ch in range(min(cq - dl, nC - 1) + 1) for j in sel[b][ch]]
            mem = visible[-c.M:] if visible else []
            if mem:
                rows = slice(cq * c.C, min(T, (cq + 1) * c.C))
                mask[b, rows, mem] = True
    return mask.to(device)


# Two selections count as the same up to rounding when, chunk by chunk, the
# innovations of the chosen positions (in this script's values, sorted)
# differ by at most this much relative: a few float32 ulps.
TIE_REL = 2e-6


class Trace:
    """Reconciles this script's eidetic selection with the Go one and keeps
    diagnostics. go_sel: [memory layers, B, T/C, k_sel] from the golden file,
    or None to use only this script's selection."""

    def __init__(self, go_sel=None):
        self.go_sel = go_sel
        self.layer = 0
        self.innov = []          # this script's innovation per memory layer
        self.sel_gap = math.inf  # smallest relative gap k-th / (k+1)-th innovation
        self.spread = []         # per chunk: (max - min) / mean of the innovation
        self.mem_keys = 0
        self.same = self.near = self.differ = 0  # chunks
        self.worst = 0.0         # largest relative value gap of a differing chunk

    def select(self, e, c):
        own, gap = select_chunks(e, c.C, c.k_sel)
        self.sel_gap = min(self.sel_gap, gap)
        self.innov.append(e.detach())
        ed = e.detach().double().cpu()
        nC = e.shape[1] // c.C
        for b in range(e.shape[0]):
            for ch in range(nC):
                v = ed[b, ch * c.C:(ch + 1) * c.C]
                self.spread.append(float((v.max() - v.min()) / v.mean().abs().clamp_min(1e-30)))
        if self.go_sel is None:
            return own
        go = self.go_sel[self.layer].tolist()
        self.layer += 1
        out = []
        for b, (mine, theirs) in enumerate(zip(own, go)):
            row = []
            for m, g in zip(mine, theirs):
                if m == sorted(g):
                    self.same += 1
                    row.append(m)
                    continue
                vm = sorted((float(ed[b, j]) for j in m), reverse=True)
                ok = all(0 <= j < e.shape[1] for j in g) and len(set(g)) == len(g) == len(m)
                vg = sorted((float(ed[b, j]) for j in g), reverse=True) if ok else []
                d = max((abs(x - y) / max(abs(x), 1e-30) for x, y in zip(vm, vg)), default=math.inf) if ok else math.inf
                self.worst = max(self.worst, d)
                if d <= TIE_REL:
                    self.near += 1
                    row.append(sorted(g))  # a tie up to rounding: follow Go
                else:
                    self.differ += 1
                    row.append(m)
            out.append(row)
        return out


def attn_mixer(u, f, P, p, c, mixer, tr):
    """The B'MOJO mixer (docs/model.md section 4); with mixer 'attention' only the
    context keys exist. One softmax over the concatenated key set
    [context | fading | memory], each part masked. Returns (out, aux|None)."""
    Bsz, T, _ = u.shape
    H, G, D = c.H, c.G, c.D
    dev = u.device
    wq, wk, wv = P[p + "attn.q_proj.weight"], P[p + "attn.k_proj.weight"], P[p + "attn.v_proj.weight"]
    q = linear(u, wq).view(Bsz, T, H, D)
    k = linear(u, wk).view(Bsz, T, G, D)
    v = linear(u, wv).view(Bsz, T, G, D)
    qr, kr = rope(q, c.theta), rope(k, c.theta)
    kvh = torch.tensor([h * G // H for h in range(H)], device=dev)

    def heads(x, kv=True):  # [B,T,nh,D] -> [B,H,T,D]
        return (x.index_select(2, kvh) if kv else x).permute(0, 2, 1, 3)

    scale = 1.0 / math.sqrt(D)
    tq = torch.arange(T, device=dev)[:, None]
    tk = torch.arange(T, device=dev)[None, :]
    Q = heads(qr, kv=False)
    neg = float("-inf")
    ctx = (tk <= tq) & (tk >= tq - c.wc + 1)
    scores = [(Q @ heads(kr).transpose(-1, -2) * scale).masked_fill(~ctx, neg)]
    values = [heads(v)]
    aux = None
    if mixer == "bmojo" and c.wf > 0:
        kf = rope(linear(f, wk).view(Bsz, T, G, D), c.theta)
        vf = linear(f, wv).view(Bsz, T, G, D)
        fad = (tk <= tq - c.wc) & (tk >= tq - c.wc - c.wf + 1)
        scores.append((Q @ heads(kf).transpose(-1, -2) * scale).masked_fill(~fad, neg))
        values.append(heads(vf))
    if mixer == "bmojo" and c.has_memory():
        # predictor p_j = W_p f_{j-1}, innovation e_j = mean_i (u_j - p_j)^2;
        # aux trains W_p only (stop-gradient on u and f).
        fd = f.detach()
        pin = torch.cat([torch.zeros_like(fd[:, :1]), fd[:, :-1]], dim=1)
        pred = linear(pin, P[p + "attn.predictor.weight"])
        e = ((u.detach() - pred) ** 2).mean(-1)  # [B,T]
        aux = e.mean()
        sel = tr.select(e, c)
        mm = memory_mask(sel, c, T, dev)
        tr.mem_keys += int(mm.sum())
        if c.memory_rope == "none":
            Qm, Km = heads(q, kv=False), heads(k)
        else:
            Qm, Km = Q, heads(kr)
        scores.append((Qm @ Km.transpose(-1, -2) * scale).masked_fill(~mm[:, None], neg))
        values.append(heads(v))
    w = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
    o = sum(w[..., i * T:(i + 1) * T] @ val for i, val in enumerate(values))  # [B,H,T,D]
    o = o.permute(0, 2, 1, 3).reshape(Bsz, T, H * D)
    return linear(o, P[p + "attn.o_proj.weight"]), aux


def forward(P, c, tokens, targets, tr=None):
    """Returns (logits [B,T,V], ce, aux_sum, total) per docs/model.md section 2."""
    tr = tr or Trace()
    x = P["embed.weight"][tokens.long()]
    aux_sum = torch.zeros((), dtype=x.dtype, device=x.device)
    for i, mx in enumerate(c.mixers):
        p = f"layers.{i}."
        u = rmsnorm(x, P[p + "norm1.weight"])
        if mx == "mamba":
            x = x + ssm(u, P, p, c)
        else:
            f = ssm(u, P, p, c) if mx == "bmojo" else None
            o, aux = attn_mixer(u, f, P, p, c, mx, tr)
            x = x + o
            if aux is not None:
                aux_sum = aux_sum + aux
        if c.Fff > 0:
            h = rmsnorm(x, P[p + "norm2.weight"])
            x = x + linear(silu(linear(h, P[p + "mlp.gate_proj.weight"])) * linear(h, P[p + "mlp.up_proj.weight"]),
                           P[p + "mlp.down_proj.weight"])
    logits = linear(rmsnorm(x, P["norm_f.weight"]), P["embed.weight"])
    tg = targets.long()
    lab = tg >= 0
    nlab = int(lab.sum())
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, tg.clamp(min=0)[..., None])[..., 0]
    if nlab > 0:
        ce = ((lse - picked) * lab).sum() / nlab
    else:
        ce = torch.zeros((), dtype=x.dtype, device=x.device)
    total = ce + c.lam * aux_sum
    return logits, ce, aux_sum, total


# ---------------------------------------------------------------------------
# optimizer (docs/model.md section 6, semantics of model/optim.go)

def lr_at(o, s):
    if s < o["warmup_steps"]:
        return o["lr"] * (s + 1) / o["warmup_steps"]
    span = o["total_steps"] - o["warmup_steps"]
    if span <= 0:
        return o["lr"]
    pr = min(1.0, (s - o["warmup_steps"]) / span)
    lo = o["lr"] * o["min_lr_frac"]
    return lo + 0.5 * (o["lr"] - lo) * (1 + math.cos(math.pi * pr))


class AdamW:
    """Global-norm clipping, then AdamW with decoupled weight decay
    p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), wd on matrices only."""

    def __init__(self, params, o):
        self.o = o
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}
        self.step = 0  # completed updates

    @torch.no_grad()
    def apply(self, params, grads, sched_step):
        o = self.o
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
        lr = lr_at(o, sched_step)
        if not math.isfinite(norm):
            return norm, lr, True
        scale = o["clip_norm"] / norm if o["clip_norm"] > 0 and norm > o["clip_norm"] else 1.0
        self.step += 1
        b1, b2, eps = o["beta1"], o["beta2"], o["eps"]
        bc1, bc2 = 1 - b1 ** self.step, 1 - b2 ** self.step
        for k, p in params.items():
            g = grads[k] * scale
            wd = o["weight_decay"] if decays(k, list(p.shape)) else 0.0
            self.m[k].mul_(b1).add_(g, alpha=1 - b1)
            self.v[k].mul_(b2).add_(g * g, alpha=1 - b2)
            upd = (self.m[k] / bc1) / (torch.sqrt(self.v[k] / bc2) + eps) + wd * p
            p.sub_(lr * upd)
        return norm, lr, False


# ---------------------------------------------------------------------------
# checks

# docs/model.md section 5 (CUDA bf16 vs CPU fp32), the contract every backend meets.
# The gradient norm and the eidetic selection have no docs/model.md figure: bf16
# matrix products move innovations by ~1e-3 relative, which can reorder a
# chunk's top-k, and the norm by up to a few 1e-3 (cosine 0.999 allows more),
# so this tier follows the Go selection when the values differ by <= 1e-2 and
# holds the norm to 1e-2.
CONTRACT = dict(logits_abs=2e-2, loss_rel=1e-3, grad_cos=0.999, grad_rel=None, curve_rel=1e-3,
                gnorm_rel=1e-2, innov_abs=1e-3, tie_rel=1e-2)
# --strict: for an fp32 CPU golden against the float64 reference. Measured
# errors are ~1e-7 relative; a wrong mask, delay or rotation of the memory
# path moves gradients by 1e-3..1e-1 relative but can stay inside CONTRACT
# (at initialisation attention is nearly uniform), so the CPU backend is held
# to this.
STRICT = dict(logits_abs=1e-4, loss_rel=1e-5, grad_cos=0.99999, grad_rel=1e-4, curve_rel=1e-4,
              gnorm_rel=1e-5, innov_abs=1e-5, tie_rel=2e-6)


class Report:
    def __init__(self):
        self.rows = []
        self.failed = 0

    def add(self, name, ok, maxabs="", rel="", cos="", note=""):
        self.rows.append((name, maxabs, rel, cos, "pass" if ok else "FAIL", note))
        if not ok:
            self.failed += 1

    def print(self, out=sys.stdout):
        hdr = ("tensor", "max_abs_err", "rel_err", "cosine", "result", "tolerance / note")
        fmt = lambda v: v if isinstance(v, str) else f"{v:.3e}"  # noqa: E731
        rows = [hdr] + [(r[0], fmt(r[1]), fmt(r[2]), (r[3] if isinstance(r[3], str) else f"{r[3]:.7f}"), r[4], r[5])
                        for r in self.rows]
        w = [max(len(r[i]) for r in rows) for i in range(5)]
        for r in rows:
            print("  ".join(r[i].ljust(w[i]) for i in range(5)) + "  " + r[5], file=out)


def cosine(a, b):
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float((a * b).sum()) / (na * nb)


def compare_tensor(rep, name, go, ref, *, abs_tol=None, cos_tol=None, rel_tol=None):
    """rel_err is max|go - ref| / max|ref| (elementwise relative errors are
    meaningless for entries near zero)."""
    go, ref = go.double().cpu().flatten(), ref.detach().double().cpu().flatten()
    if go.shape != ref.shape:
        rep.add(name, False, note=f"{go.numel()} elements vs reference {ref.numel()}")
        return
    if not bool(torch.isfinite(go).all()):
        rep.add(name, False, note="Go value has NaN/Inf")
        return
    diff = (go - ref).abs()
    maxabs = float(diff.max()) if diff.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    rel = maxabs / scale if scale > 0 else (0.0 if maxabs == 0 else math.inf)
    cs = cosine(go, ref)
    ok, notes = True, []
    if abs_tol is not None:
        ok &= maxabs <= abs_tol
        notes.append(f"abs <= {abs_tol:g}")
    if cos_tol is not None:
        ok &= cs >= cos_tol
        notes.append(f"cos >= {cos_tol:g}")
    if rel_tol is not None:
        ok &= rel <= rel_tol
        notes.append(f"rel <= {rel_tol:g}")
    rep.add(name, ok, maxabs, rel, cs, ", ".join(notes))


def scalar(x):
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def compare_scalar(rep, name, go, ref, rel_tol, extra=""):
    go, ref = scalar(go), scalar(ref)
    err = abs(go - ref)
    rel = err / abs(ref) if ref != 0 else (0.0 if err == 0 else math.inf)
    ok = math.isfinite(go) and rel <= rel_tol
    rep.add(name, ok, err, rel, "", f"rel <= {rel_tol:g}  (go {go:.7g}, ref {ref:.7g}){extra}")


def need(ts, name):
    if name not in ts:
        raise InputError(f"golden file has no tensor {name!r}")
    return ts[name]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("golden", help="safetensors file written by tools/torchref/dump")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--strict", action="store_true",
                    help="tight tolerances for an fp32 CPU golden (see STRICT) instead of docs/model.md section 5's")
    ap.add_argument("--steps", type=int, default=-1, help="optimizer steps to replay (default: all in the file)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--scan-chunk", type=int, default=0,
                    help="time steps per chunk of the selective scan (default 4 on CPU, 32 on CUDA)")
    ap.add_argument("--own-selection", action="store_true",
                    help="never follow the Go eidetic selection at near-ties (see TIE_REL)")
    ap.add_argument("--selftest", action="store_true",
                    help="also check the chunked scan against the step-by-step recurrence on the first SSM layer")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except InputError as e:
        print(f"bmojo_ref.py: {e}", file=sys.stderr)
        return 2


def run(args):
    global SCAN_CHUNK
    t0 = time.time()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {args.device} but torch.cuda.is_available() is false")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    SCAN_CHUNK = args.scan_chunk or (32 if dev.type == "cuda" else 4)
    tol = STRICT if args.strict else CONTRACT
    global TIE_REL
    TIE_REL = tol["tie_rel"]

    ts, meta = load_safetensors(args.golden)
    if meta.get("format") != FORMAT:
        raise InputError(f"{args.golden}: metadata format is {meta.get('format')!r}, want {FORMAT!r} "
                         "(write it with tools/torchref/dump)")
    try:
        cj, oj, dj = json.loads(meta["config"]), json.loads(meta["optim"]), json.loads(meta["decay"])
    except KeyError as e:
        raise InputError(f"{args.golden}: metadata lacks {e}") from None
    except ValueError as e:
        raise InputError(f"{args.golden}: metadata JSON: {e}") from None
    if not isinstance(cj, dict) or not isinstance(oj, dict) or not isinstance(dj, list):
        raise InputError(f"{args.golden}: config/optim metadata must be JSON objects, decay a list")
    c = Config(cj)
    for k in ("lr", "min_lr_frac", "warmup_steps", "total_steps", "beta1", "beta2", "eps", "weight_decay", "clip_norm"):
        if k not in oj:
            raise InputError(f"{args.golden}: optim metadata lacks {k!r}")

    print(f"== {args.golden}: preset {meta.get('preset', '?')}, mixers {','.join(c.mixers)}, "
          f"d={c.d} T={c.T} B={meta.get('batch', '?')} M={c.M} w_c={c.wc} w_f={c.wf} C={c.C}; "
          f"Go {meta.get('backend', '?')}/{meta.get('dtype', '?')}; "
          f"torch {torch.__version__} {args.device}/{args.dtype}; "
          f"{'strict' if args.strict else 'docs/model.md section 5'} tolerances")
    rep = Report()

    # layout (docs/model.md section 7) and decay groups (section 6)
    lay = expected_layout(c)
    have = {k[len("param."):]: list(v.shape) for k, v in ts.items() if k.startswith("param.")}
    missing = [k for k in lay if k not in have]
    extra = [k for k in have if k not in lay]
    badshape = [k for k in lay if k in have and have[k] != lay[k]]
    note = "docs/model.md section 7 names and shapes"
    if missing or extra or badshape:
        note = f"missing {missing[:4]} extra {extra[:4]} shape {badshape[:4]}"
    rep.add("layout", not (missing or extra or badshape), note=note)
    if missing or badshape:
        rep.print()
        return 1
    want_decay = sorted(k for k in lay if decays(k, lay[k]))
    rep.add("decay groups", sorted(dj) == want_decay,
            note="matrices only" if sorted(dj) == want_decay else
            f"Go decays {sorted(set(dj) - set(want_decay))[:4]} extra, {sorted(set(want_decay) - set(dj))[:4]} missing")

    P = {k: need(ts, "param." + k).to(device=dev, dtype=dtype).requires_grad_(True) for k in lay}
    tokens, targets = need(ts, "tokens").to(dev), need(ts, "targets").to(dev)
    if tokens.dim() != 2 or tokens.shape != targets.shape:
        raise InputError(f"tokens {tuple(tokens.shape)} and targets {tuple(targets.shape)} must both be [B,T]")
    if tokens.shape[1] != c.T:
        raise InputError(f"tokens have length {tokens.shape[1]}, config seq_len is {c.T}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= c.V or int(targets.max()) >= c.V:
        raise InputError("tokens or targets outside the vocabulary")
    has_mem = c.has_memory() and "bmojo" in c.mixers
    follow = not args.own_selection

    if args.selftest:
        selftest(P, c, tokens, rep)

    # golden forward/backward
    tr = Trace(need(ts, "select") if has_mem and follow else None)
    logits, ce, aux, total = forward(P, c, tokens, targets, tr)
    names = list(lay)
    grads = torch.autograd.grad(total, [P[k] for k in names], allow_unused=True)
    if has_mem:
        compare_tensor(rep, "innovation", need(ts, "innovation"), torch.stack(tr.innov), abs_tol=tol["innov_abs"])
        if follow:
            ok = tr.differ == 0
            rep.add("select", ok, "", tr.worst if tr.near or tr.differ else 0.0, "",
                    f"{tr.same} chunks equal, {tr.near} near-ties (value gap <= {TIE_REL:g}: Go's followed), "
                    f"{tr.differ} differ")
    compare_tensor(rep, "logits", need(ts, "logits"), logits.reshape(need(ts, "logits").shape), abs_tol=tol["logits_abs"])
    compare_scalar(rep, "loss_ce", need(ts, "loss_ce"), ce, tol["loss_rel"])
    compare_scalar(rep, "loss_aux", need(ts, "loss_aux"), aux, tol["loss_rel"])
    compare_scalar(rep, "loss_total", need(ts, "loss_total"), total, tol["loss_rel"])
    for k, g in zip(names, grads):
        if g is None:
            g = torch.zeros_like(P[k])
        compare_tensor(rep, "grad." + k, need(ts, "grad." + k), g, cos_tol=tol["grad_cos"], rel_tol=tol["grad_rel"])
    info = []
    if has_mem:
        sp = sorted(tr.spread)
        info.append(f"innovation spread within a chunk (max-min)/mean: median {sp[len(sp) // 2]:.2e}, "
                    f"min {sp[0]:.2e}; smallest k-th/(k+1)-th gap {tr.sel_gap:.2e} (float32 ulp 1.2e-07)")
        info.append(f"{tr.mem_keys} (query, memory key) pairs per head in the first batch")

    # optimizer steps
    curve = need(ts, "curve")
    nsteps = curve.numel() if args.steps < 0 else min(args.steps, curve.numel())
    if nsteps > 0:
        btok, btgt = need(ts, "batch.tokens").to(dev), need(ts, "batch.targets").to(dev)
        bsel = need(ts, "batch.select") if has_mem and follow else None
        lrs, gns = need(ts, "curve.lr"), need(ts, "curve.grad_norm")
        if btok.shape[0] < nsteps or btgt.shape != btok.shape or lrs.numel() < nsteps or gns.numel() < nsteps:
            raise InputError(f"batch.tokens {tuple(btok.shape)} / batch.targets {tuple(btgt.shape)} / curve.* "
                             f"do not cover {nsteps} steps")
        W = {k: P[k].detach().clone().requires_grad_(True) for k in names}
        opt = AdamW({k: W[k].detach() for k in names}, oj)
        my_curve, my_lr, my_gn = [], [], []
        near = differ = 0
        for s in range(nsteps):
            st = Trace(bsel[s] if bsel is not None else None)
            _, _, _, tot = forward(W, c, btok[s], btgt[s], st)
            near, differ = near + st.near, differ + st.differ
            gs = torch.autograd.grad(tot, [W[k] for k in names], allow_unused=True)
            gd = {k: (g if g is not None else torch.zeros_like(W[k])) for k, g in zip(names, gs)}
            gn, lr, skipped = opt.apply(W, gd, s)
            my_curve.append(scalar(tot))
            my_lr.append(lr)
            my_gn.append(gn)
            if skipped:
                rep.add(f"curve[{s}]", False, note=f"reference gradient norm is {gn}")
        if bsel is not None:
            rep.add("batch.select", differ == 0, note=f"{near} near-ties followed, {differ} chunks differ over {nsteps} steps")
        for s in range(nsteps):
            compare_scalar(rep, f"curve[{s}]", curve[s], my_curve[s], tol["curve_rel"])
        lr_abs = [abs(float(lrs[s]) - my_lr[s]) for s in range(nsteps)]
        lr_rel = max(lr_abs[s] / abs(my_lr[s]) for s in range(nsteps))
        rep.add("curve.lr", lr_rel <= 1e-9, max(lr_abs), lr_rel, "",
                f"rel <= 1e-9  (schedule {' '.join(f'{x:.3g}' for x in my_lr)})")
        # The gradient norm is gated at step 0 only, where both sides start
        # from the same weights; later norms follow float32 vs float64
        # trajectories and can move 1e-3 relative at a loss spike.
        gn_rel = [abs(float(gns[s]) - my_gn[s]) / my_gn[s] for s in range(nsteps)]
        later = f"; later steps max rel {max(gn_rel[1:]):.1e}, not gated" if nsteps > 1 else ""
        rep.add("curve.grad_norm[0]", gn_rel[0] <= tol["gnorm_rel"], abs(float(gns[0]) - my_gn[0]), gn_rel[0], "",
                f"rel <= {tol['gnorm_rel']:g}  (norms {' '.join(f'{x:.3g}' for x in my_gn)}; clip {oj['clip_norm']:g}{later})")

    rep.print()
    for line in info:
        print("   " + line)
    status = "ok" if rep.failed == 0 else f"FAILED ({rep.failed} of {len(rep.rows)} checks)"
    print(f"== {os.path.basename(args.golden)}: {len(rep.rows)} checks, {status}, {time.time() - t0:.1f} s")
    return 0 if rep.failed == 0 else 1


def selftest(P, c, tokens, rep):
    """Chunked scan vs the step-by-step recurrence on the first SSM layer."""
    for i, mx in enumerate(c.mixers):
        if mx in ("bmojo", "mamba"):
            p = f"layers.{i}."
            with torch.no_grad():
                x = P["embed.weight"][tokens.long()]
                u = rmsnorm(x, P[p + "norm1.weight"])
                a = ssm(u, P, p, c, scan=selective_scan)
                b = ssm(u, P, p, c, scan=scan_loop)
            compare_tensor(rep, f"selftest: chunked scan, layer {i}", a, b,
                           rel_tol=1e-12 if a.dtype == torch.float64 else 1e-5)
            return


if __name__ == "__main__":
    sys.exit(main())
