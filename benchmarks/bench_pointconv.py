"""Pointwise CNN (Hua et al., CVPR 2018): the authors' four-layer network on 128 clouds of 2048 points.

Four 3x3x3 Pointwise convolutions of 9 channels (dilations 1-4, cell size 0.1, SELU, concatenated,
``pointconv.nn.PointwiseCNN``) on generated shapes fitted to the unit sphere, as the authors'
ModelNet40 clouds (``pointconv.demos.shapes``),
coordinates as input features; forward and backward of a cross-entropy loss. Rows:

- neighbors: building the four neighbor structures (once per batch of clouds; the authors rebuild
  them inside every forward and backward); their adjoint matrices are left to the first backward
  that needs them (the first layer's input needs no gradient, so its adjoint is never built);
- forward, backward: with the structures built; forward + neighbors: a forward that builds them;
- training step: what a step on a new batch costs, neighbors + forward + backward (the paper's
  figure: its forward + backward, which rebuild the structures themselves);
- reference: ``pointconv.use_backend("reference")`` (dense (N, N, 27) membership per cloud), run
  on ``--ref-clouds`` clouds and scaled linearly to the batch (its cost is per cloud); its outputs
  on those clouds are compared with pointconv's in the same run.

The paper reports 1.272 s forward and 2.423 s backward for this batch on a 16-thread Core i7-6900K.

    python benchmarks/bench_pointconv.py --device cpu
"""
from __future__ import annotations

import argparse
import time

import torch

import pointconv
from pointconv.demos._cli import check_device, positive_int
from pointconv._timing import provenance, timed_ms
from pointconv.demos.shapes import CLASSES, sample_shape

PAPER_MS = {"forward": 1272.0, "backward": 2423.0}


def clouds(batch, n_points, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch) % len(CLASSES)
    points = torch.stack([sample_shape(int(c), n_points, g, min_scale=1.0) for c in labels])  # unit sphere, as ModelNet
    return points.to(device), labels.to(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=positive_int, default=128)
    ap.add_argument("--points", type=positive_int, default=2048)
    ap.add_argument("--repeat", type=positive_int, default=3)
    ap.add_argument("--ref-clouds", type=positive_int, default=2)
    args = ap.parse_args(argv)
    try:  # before any work: a clear error, not a traceback from the first CUDA call
        check_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = pointconv.nn.PointwiseCNN(len(CLASSES)).to(device)
    points, labels = clouds(args.batch, args.points, device)

    def timed(fn):
        return timed_ms(fn, device, args.repeat, warmup=1)

    def loss_of(p, y, nbrs=None):
        return torch.nn.functional.cross_entropy(model(p, neighbors=nbrs), y)

    build_ms, nbrs = timed(lambda: model.neighbors(points))
    fwd_ms, _ = timed(lambda: loss_of(points, labels, nbrs))
    fwd_build_ms, _ = timed(lambda: loss_of(points, labels))

    def backward():
        loss = loss_of(points, labels, nbrs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) * 1e3

    backward()
    bwd_ms = sorted(backward() for _ in range(args.repeat))[args.repeat // 2]
    # a training step on a new batch: its neighbor structures (the adjoint matrices included, which
    # the backward builds on first use), forward, backward
    step_ms, _ = timed(lambda: loss_of(points, labels, model.neighbors(points)).backward())
    pairs = sum(n.num_pairs for n in nbrs)

    # the reference on a few clouds, scaled to the batch; and the agreement of the outputs there
    r = min(args.ref_clouds, args.batch)  # (points[:r] holds at most the batch)
    with pointconv.use_backend("reference"):
        ref_fwd_ms, ref_logits = timed_ms(lambda: model(points[:r]), device, 1)
        ref_loss = torch.nn.functional.cross_entropy(ref_logits, labels[:r])
        ref_bwd_ms, _ = timed_ms(lambda: ref_loss.backward(), device, 1)
    ours_logits = model(points[:r], neighbors=model.neighbors(points[:r]))
    diff = float((ours_logits - ref_logits).detach().abs().max())
    scale = args.batch / r

    print(provenance("bench_pointconv", device))
    print(f"> PointwiseCNN (4 x Pointwise conv 9 ch, dilations 1-4, cell 0.1), {args.batch} clouds x {args.points} points, "
          f"{pairs / (args.batch * args.points):.1f} neighbor pairs per point over the 4 layers; reference on {r} clouds "
          f"x {scale:g}; max |logit difference| to the reference {diff:.1e}")
    print()
    print("| task | pointconv ms | reference ms | reference / pointconv | paper ms (16 threads) | paper / pointconv |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = [("neighbors (4 structures)", build_ms, None, None),
            ("forward", fwd_ms, ref_fwd_ms * scale, PAPER_MS["forward"]),
            ("forward + neighbors", fwd_build_ms, ref_fwd_ms * scale, PAPER_MS["forward"]),
            ("backward", bwd_ms, ref_bwd_ms * scale, PAPER_MS["backward"]),
            ("training step (neighbors + forward + backward)", step_ms, (ref_fwd_ms + ref_bwd_ms) * scale,
             PAPER_MS["forward"] + PAPER_MS["backward"])]
    if (args.batch, args.points) != (128, 2048):  # the paper's figures are for that batch only
        rows = [(task, ms, ref, None) for task, ms, ref, _ in rows]
    for task, ms, ref, paper in rows:
        ref_cells = f"{ref:.0f} | {ref / ms:.1f}x" if ref else "- | -"
        paper_cells = f"{paper:.0f} | {paper / ms:.2f}x" if paper else "- | -"
        print(f"| {task} | {ms:.0f} | {ref_cells} | {paper_cells} |", flush=True)


if __name__ == "__main__":
    main()
