#!/usr/bin/env python3
"""PyTorch Gloo all-reduce on loopback: the reference for `bmojo bench allreduce`.

Same ranks, sizes and columns: per size the slowest rank's mean time, algbw =
size/time and busbw = algbw * 2(N-1)/N (nccl-tests definitions, GB = 1e9
bytes), the CPU time of all rank processes per collective (user + system, as
bmojo's "# cpu(ms)" line), then the latency at 1 MiB. float32 tensors on the
CPU, SUM.

    python3 bench/gloo_allreduce.py --ranks 4 --size 1GiB
"""
import argparse
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_bytes(s):
    s = s.strip()
    for suf, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("B", 1)):
        if s.endswith(suf):
            return int(s[: -len(suf)]) * m
    return int(s)


def fmt_bytes(b):
    for suf, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= m and b % m == 0:
            return f"{b // m}{suf}"
    return f"{b}B"


def size_list(args):
    top = parse_bytes(args.size)
    if args.sizes in ("", "sweep"):
        out, s = [], 1 << 20
        while s <= top:
            out.append(s)
            s *= 2
        return out or [top]
    return [parse_bytes(p) for p in args.sizes.split(",")]


def iters_for(size, fixed):
    if fixed > 0:
        return fixed
    return min(50, max(3, (1 << 30) // size))


def process_cpu():
    """This process's CPU time so far (all its threads), user + system, in seconds."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def worker(rank, args, port, queue):
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks)
    sizes = size_list(args)
    big = torch.arange(max(sizes) // 4, dtype=torch.float32).remainder_(7).mul_(0.25)
    for s in sizes:
        t = big[: s // 4]
        for _ in range(2):
            dist.all_reduce(t)
        iters = iters_for(s, args.iters)
        times = []
        cpu0 = process_cpu()
        for _ in range(iters):
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        cpu = torch.tensor([(process_cpu() - cpu0) / iters], dtype=torch.float64)
        stats = torch.tensor([sum(times) / iters, min(times)], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # slowest rank
        dist.all_reduce(cpu)  # all ranks together
        if rank == 0:
            queue.put((s, iters, stats[0].item(), stats[1].item(), cpu[0].item()))
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--size", default="256MiB")
    p.add_argument("--sizes", default="sweep")
    p.add_argument("--iters", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per rank (0: torch's default)")
    p.add_argument("--port", type=int, default=29517)
    args = p.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, like bmojo's bench
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(worker, args=(args, args.port, queue), nprocs=args.ranks, join=True)
    n = args.ranks
    print(f"# torch {torch.__version__} gloo all-reduce: {n} ranks (processes) on loopback, float32, SUM")
    print(f"{'size':>12} {'count':>12} {'iters':>6} {'time(us)':>12} {'min(us)':>12} {'algbw(GB/s)':>10} {'busbw(GB/s)':>10}")
    rows = []
    while not queue.empty():
        rows.append(queue.get())
    lat = None
    cpus = []
    for s, iters, mean, best, cpu in sorted(rows):
        alg = s / mean / 1e9
        print(f"{fmt_bytes(s):>12} {s // 4:>12} {iters:>6} {mean * 1e6:>12.1f} {best * 1e6:>12.1f} {alg:>10.3f} {alg * 2 * (n - 1) / n:>10.3f}")
        cpus.append(f"{fmt_bytes(s)} {cpu * 1e3:.1f}")
        if s == 1 << 20:
            lat = (mean, best)
    print(f"# cpu(ms) per collective, all ranks, user+system: {', '.join(cpus)}")
    if lat:
        print(f"# latency at 1MiB: mean {lat[0] * 1e6:.1f} us, best {lat[1] * 1e6:.1f} us")


if __name__ == "__main__":
    main()
