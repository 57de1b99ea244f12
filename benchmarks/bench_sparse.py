"""Sparse convolution: pointconv.sparse against spconv 2.3.8 in the same run.

(a) one SubMConv3d, 64 -> 64 channels, on a voxelized sphere shell (about 175K voxels in a 256^3
    grid), forward and backward, kernel-map build included (a fresh tensor each run).
(b) spconv's benchmark network is not scripted yet (next session).

spconv runs on the CPU wheel (``spconv``) or, on a GPU machine, ``spconv-cu126``. Its CPU kernels
race when torch uses more than one thread, so the table lists spconv with all threads (its
default, results vary) and with one thread (correct); pointconv uses all threads and is
deterministic. spconv 2.3.8's backward fails with a CPU-only torch (it asks for a CUDA stream),
so on CPU only the forward is compared with it.

    python benchmarks/bench_sparse.py --device cpu
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch

import pointconv.sparse as ours


def sphere_shell(radius=120.0, size=256, device="cpu"):
    """Integer sites within half a voxel of a sphere of radius 120: a one-voxel shell (~181K sites)."""
    t = torch.arange(size, dtype=torch.float32, device=device) - size / 2 + 0.5
    sites = []
    for z in range(size):  # one slice at a time keeps memory small
        zz = t[z]
        r = torch.sqrt(zz * zz + t[:, None] ** 2 + t[None, :] ** 2)
        yx = torch.nonzero((r - radius).abs() < 0.5)
        sites.append(torch.cat([torch.full((len(yx), 1), z, device=device), yx], 1))
    zyx = torch.cat(sites).int()
    return torch.cat([torch.zeros(len(zyx), 1, dtype=torch.int32, device=device), zyx], 1).contiguous()


def timed(fn, device, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    try:
        import spconv.pytorch as spconv
    except ImportError:
        spconv = None
    idx = sphere_shell(device=device)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(idx), 64, generator=g).to(device)
    conv_ours = ours.SubMConv3d(64, 64, 3, bias=False).to(device)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"> bench_sparse (a): device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"commit {rev}, {time.strftime('%Y-%m-%d')}")
    print(f"> SubMConv3d 64 -> 64, k = 3, {len(idx):,} voxels of a sphere shell in a 256^3 grid, float32, "
          f"kernel-map build included in every run, median of {args.repeat}")
    print()
    print("| task | method | threads | ms | ms / pointconv ms |")
    print("|---|---|---:|---:|---:|")

    def run(module, cls, backward):
        def step():
            x = cls.SparseConvTensor(feats.clone().requires_grad_(backward), idx.clone(), [256, 256, 256], 1)
            y = module(x)
            if backward:
                y.features.square().sum().backward()
        return step

    for task, backward in (("forward", False), ("forward + backward", True)):
        rows = [("pointconv.sparse", torch.get_num_threads(), timed(run(conv_ours, ours, backward), device, args.repeat))]
        if spconv is not None:
            conv_sp = spconv.SubMConv3d(64, 64, 3, bias=False).to(device)
            conv_sp.load_state_dict(conv_ours.state_dict())
            thread_counts = [torch.get_num_threads()]
            if device.type == "cpu" and torch.get_num_threads() > 1:
                thread_counts.append(1)
            threads0 = torch.get_num_threads()
            for threads in thread_counts:
                torch.set_num_threads(threads)
                try:
                    rows.append(("spconv 2.3.8", threads, timed(run(conv_sp, spconv, backward), device, args.repeat)))
                except (AssertionError, RuntimeError) as e:
                    rows.append(("spconv 2.3.8", threads, f"fails: {str(e).splitlines()[0][:60]}"))
                finally:
                    torch.set_num_threads(threads0)
        base = rows[0][2]
        for method, threads, ms in rows:
            cell = f"{ms:.1f} | {ms / base:.2f}x" if isinstance(ms, float) else f"{ms} | "
            print(f"| {task} | {method} | {threads} | {cell} |", flush=True)
    if spconv is None:
        print("\n(spconv is not installed: pip install spconv==2.3.8 for the baseline)")


if __name__ == "__main__":
    main()
