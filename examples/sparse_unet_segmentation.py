"""Semantic segmentation of generated scenes with a sparse UNet (``pointconv.sparse``, spconv API).

Scenes: a noisy ground plane (class 0), boxes (class 1) and spheres (class 2), sampled on their
surfaces. Points -> ``PointToVoxel`` -> SubM / strided / inverse convolutions with skip
connections -> voxel logits -> per-point labels with ``gather_features_by_pc_voxel_id``.
Trains on fresh scenes each step, reports the point accuracy on held-out scenes, and writes a
PNG (top view: ground truth and prediction).

    python examples/sparse_unet_segmentation.py            # 200 steps, about 25 s on 2 cores
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import pointconv.sparse as spconv
from pointconv.demos._cli import check_out, positive_int, seed_int
from pointconv.sparse.utils import PointToVoxel, gather_features_by_pc_voxel_id

EXTENT = 8.0
VOXEL = 0.1


def make_scene(g: torch.Generator, n_points=12000):
    """Points (N, 3) in [0, 8)^3 with labels (N,): ground 0, boxes 1, spheres 2."""
    parts, labels = [], []
    n_ground = n_points // 3
    ground = torch.rand(n_ground, 3, generator=g) * torch.tensor([EXTENT, EXTENT, 0.0])
    ground[:, 2] = 0.2 + 0.03 * torch.randn(n_ground, generator=g)
    parts.append(ground)
    labels.append(torch.zeros(n_ground, dtype=torch.long))
    n_obj = (n_points - n_ground) // 4
    for i in range(4):
        center = torch.rand(3, generator=g) * (EXTENT - 2.4) + 1.2
        size = 0.5 + torch.rand(1, generator=g).item() * 0.7
        center[2] = 0.25 + size
        if i % 2 == 0:  # a box: points on its faces
            p = torch.rand(n_obj, 3, generator=g) * 2 - 1
            axis = torch.randint(0, 3, (n_obj,), generator=g)
            p[torch.arange(n_obj), axis] = torch.sign(p[torch.arange(n_obj), axis])
            parts.append(center + size * p)
            labels.append(torch.ones(n_obj, dtype=torch.long))
        else:  # a sphere
            v = torch.randn(n_obj, 3, generator=g)
            parts.append(center + size * v / v.norm(dim=1, keepdim=True))
            labels.append(torch.full((n_obj,), 2, dtype=torch.long))
    pts = torch.cat(parts)
    pts = pts + 0.01 * torch.randn(pts.shape, generator=g)
    return pts.clamp(0, EXTENT - 1e-3), torch.cat(labels)


def block(cin, cout, key):
    return spconv.SparseSequential(spconv.SubMConv3d(cin, cout, 3, bias=False, indice_key=key),
                                   nn.BatchNorm1d(cout), nn.ReLU())


class SparseUNet(nn.Module):
    def __init__(self, cin=4, classes=3, width=16):
        super().__init__()
        w = width
        self.enc1 = block(cin, w, "s1")
        self.down1 = spconv.SparseSequential(spconv.SparseConv3d(w, 2 * w, 2, 2, bias=False, indice_key="d1"),
                                             nn.BatchNorm1d(2 * w), nn.ReLU())
        self.enc2 = block(2 * w, 2 * w, "s2")
        self.down2 = spconv.SparseSequential(spconv.SparseConv3d(2 * w, 4 * w, 2, 2, bias=False, indice_key="d2"),
                                             nn.BatchNorm1d(4 * w), nn.ReLU())
        self.bottom = block(4 * w, 4 * w, "s3")
        self.up2 = spconv.SparseSequential(spconv.SparseInverseConv3d(4 * w, 2 * w, 2, indice_key="d2", bias=False),
                                           nn.BatchNorm1d(2 * w), nn.ReLU())
        self.dec2 = block(4 * w, 2 * w, "s2")
        self.up1 = spconv.SparseSequential(spconv.SparseInverseConv3d(2 * w, w, 2, indice_key="d1", bias=False),
                                           nn.BatchNorm1d(w), nn.ReLU())
        self.dec1 = block(2 * w, w, "s1")
        self.head = spconv.SubMConv3d(w, classes, 1)
        self.join = spconv.JoinTable()

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.down1(e1))
        b = self.bottom(self.down2(e2))
        d2 = self.dec2(self.join([self.up2(b), e2]))
        d1 = self.dec1(self.join([self.up1(d2), e1]))
        return self.head(d1)


def voxelize(pts_list):
    """A batch of clouds -> SparseConvTensor (features: mean offset in the voxel, and 1) and the
    per-point voxel rows."""
    gen = PointToVoxel([VOXEL] * 3, [0, 0, 0, EXTENT, EXTENT, EXTENT], 3, 200000, 16)
    feats, idx, point_rows, offset = [], [], [], 0
    for b, pts in enumerate(pts_list):
        voxels, zyx, num, pid = gen.generate_voxel_with_id(pts)
        mean = voxels.sum(1) / num[:, None].float()
        centre = (zyx.flip(1).float() + 0.5) * VOXEL
        feats.append(torch.cat([(mean - centre) / VOXEL, torch.ones(len(zyx), 1)], 1))
        idx.append(torch.cat([torch.full((len(zyx), 1), b, dtype=torch.int32), zyx], 1))
        point_rows.append(torch.where(pid >= 0, pid + offset, -1))
        offset += len(zyx)
    x = spconv.SparseConvTensor(torch.cat(feats), torch.cat(idx), gen.spatial_shape, len(pts_list))
    return x, point_rows


def point_logits(model, pts_list):
    x, rows = voxelize(pts_list)
    logits = model(x).features
    return [gather_features_by_pc_voxel_id(logits, r) for r in rows]


def evaluate(model, scenes):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for pts, lab in scenes:
            pred = point_logits(model, [pts])[0].argmax(1)
            correct += int((pred == lab).sum())
            total += len(lab)
    model.train()
    return correct / total


def plot(model, scene, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts, lab = scene
    model.eval()
    with torch.no_grad():
        pred = point_logits(model, [pts])[0].argmax(1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    for ax, (title, c) in zip(axes, [("ground truth", lab), ("prediction", pred)]):
        order = torch.argsort(pts[:, 2])  # draw the tops last
        xy, c = pts[order, :2].numpy(), c[order].numpy()  # matplotlib reads tensors through a deprecated numpy path
        ax.scatter(xy[:, 0], xy[:, 1], c=c, s=1, cmap="viridis", vmin=0, vmax=2)
        ax.set_title(f"{title}: ground / boxes / spheres")
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive_int, default=200)
    ap.add_argument("--batch", type=positive_int, default=2, help="scenes per step")
    ap.add_argument("--out", default="sparse_unet_segmentation.png", help="the top views (.png, .pdf, ...)")
    ap.add_argument("--seed", type=seed_int, default=0)
    args = ap.parse_args(argv)
    try:
        check_out(args.out)  # before the training, not after it
    except ValueError as e:
        ap.error(str(e))
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = SparseUNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    held_out = [make_scene(torch.Generator().manual_seed(10_000 + i)) for i in range(3)]
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for _ in bar:
        scenes = [make_scene(g) for _ in range(args.batch)]
        logits = point_logits(model, [s[0] for s in scenes])
        loss = sum(nn.functional.cross_entropy(lg, s[1]) for lg, s in zip(logits, scenes)) / len(scenes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    acc = evaluate(model, held_out)
    plot(model, held_out[0], args.out)
    print(f"held-out point accuracy {acc:.3f} after {args.steps} steps ({time.perf_counter() - t0:.0f} s); wrote {args.out}")
    return acc


if __name__ == "__main__":
    main()
