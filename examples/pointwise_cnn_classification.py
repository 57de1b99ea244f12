"""Shape classification with the Pointwise CNN of Hua et al. (CVPR 2018), ``pointconv.nn.PointwiseCNN``.

Classes: sphere, cube, cylinder, cone, torus, octahedron, sampled on their surfaces with random
rotation, scale and jitter (``pointconv.demos.shapes``). The network is the authors' (four 3x3x3
Pointwise convolutions of 9 channels, dilations 1-4, cell size 0.1, SELU, concatenated) with a
global max + mean pooling head; inputs are the coordinates and the distance to the center. The neighbor structures of every training batch are built once
and reused in every epoch. Prints the held-out accuracy and writes a PNG of the confusion matrix.

    python examples/pointwise_cnn_classification.py          # about 1.5 minutes on 2 cores, accuracy 0.85
"""
from __future__ import annotations

import argparse
import time

import torch

import pointconv
from pointconv.demos._cli import check_out, positive_int, seed_int
from pointconv.demos.shapes import CLASSES, make_dataset


def input_features(points):
    """The coordinates (the authors' input) and the distance to the center, which does not change
    under the random rotations and helps the small net on few examples."""
    return torch.cat([points, points.norm(dim=-1, keepdim=True)], -1)


def batches(points, labels, size, model):
    """Fixed batches of the clouds with their input features and neighbor structures (built once)."""
    from tqdm import tqdm

    out = []
    for s in tqdm(range(0, len(points), size), desc="neighbors", unit="batch", leave=False):
        p = points[s:s + size]
        out.append((p, input_features(p), labels[s:s + size], model.neighbors(p)))
    return out


def confusion(model, data):
    n = len(CLASSES)
    cm = torch.zeros(n, n, dtype=torch.long)
    with torch.no_grad():
        for p, f, y, nbrs in data:
            pred = model(p, f, neighbors=nbrs).argmax(-1)
            cm += torch.bincount(y * n + pred, minlength=n * n).reshape(n, n)
    return cm


def plot_confusion(cm, path, accuracy):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = cm.numpy()  # matplotlib reads tensors through a deprecated numpy path
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Pointwise CNN, held-out accuracy {accuracy:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=positive_int, default=20)
    ap.add_argument("--per-class", type=positive_int, default=128, help="training clouds per class")
    ap.add_argument("--test-per-class", type=positive_int, default=32)
    ap.add_argument("--points", type=positive_int, default=1024, help="points per cloud")
    ap.add_argument("--batch", type=positive_int, default=32)
    ap.add_argument("--out", default="pointwise_cnn_confusion.png", help="the confusion matrix (.png, .pdf, ...)")
    ap.add_argument("--seed", type=seed_int, default=0)
    args = ap.parse_args(argv)
    try:
        check_out(args.out)  # before the training, not after it
    except ValueError as e:
        ap.error(str(e))
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = pointconv.nn.PointwiseCNN(len(CLASSES), in_channels=4)
    train = batches(*make_dataset(args.per_class, args.points, seed=args.seed), args.batch, model)
    test = batches(*make_dataset(args.test_per_class, args.points, seed=args.seed + 1000), args.batch, model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * len(train))
    bar = tqdm(range(args.epochs * len(train)), desc="training", unit="step")
    for step in bar:
        if step % len(train) == 0:
            order = torch.randperm(len(train)).tolist()
        p, f, y, nbrs = train[order[step % len(train)]]
        loss = torch.nn.functional.cross_entropy(model(p, f, neighbors=nbrs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    cm = confusion(model, test)
    accuracy = float(cm.diagonal().sum() / cm.sum())
    plot_confusion(cm, args.out, accuracy)
    print(f"held-out accuracy {accuracy:.3f} on {int(cm.sum())} clouds, {time.perf_counter() - start:.0f} s; "
          f"confusion matrix: {args.out}")
    return accuracy


if __name__ == "__main__":
    main()
