"""The main job: a short SDF fit is accurate, user clouds load, bad files are refused."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from pointconv.demos import sdf


def test_short_fit_recovers_the_torus():
    _, metrics, true_sdf, surface = sdf.train(steps=150, progress=False)
    assert metrics["Chamfer to shape"] < 0.03  # the torus is 1.7 wide; an untrained model is far off
    assert metrics["Eikonal error"] < 0.35
    assert metrics["mean abs SDF on surface"] < 0.02
    assert float(true_sdf(surface).abs().max()) < 1e-5  # the samples lie on the true surface


def test_untrained_model_fails_the_same_check():
    _, metrics, _, _ = sdf.train(steps=1, progress=False)
    assert not (metrics["Chamfer to shape"] < 0.03 and metrics["Eikonal error"] < 0.35)


def _write_ply(path, pts, binary):
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", f"element vertex {len(pts)}",
              "property float x", "property float y", "property float z", "property uchar red",
              "element face 0", "property list uchar int vertex_indices", "end_header"]
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode())
        if binary:
            rec = np.zeros(len(pts), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1")])
            rec["x"], rec["y"], rec["z"] = pts.T
            fh.write(rec.tobytes())
        else:
            fh.write("".join(f"{x} {y} {z} 7\n" for x, y, z in pts).encode())


@pytest.mark.parametrize("kind", ["npy", "xyz", "ply-ascii", "ply-binary"])
def test_read_points_formats(tmp_path, kind):
    pts = np.random.default_rng(0).random((50, 3)).astype(np.float32)
    path = tmp_path / f"cloud.{kind.split('-')[0]}"
    if kind == "npy":
        np.save(path, pts)
    elif kind == "xyz":
        np.savetxt(path, np.c_[pts, np.ones(50)])
    else:
        _write_ply(path, pts, binary=kind == "ply-binary")
    torch.testing.assert_close(sdf.read_points(str(path)), torch.from_numpy(pts).double(), rtol=1e-6, atol=1e-6)


def test_read_points_refuses_bad_files(tmp_path):
    bad = tmp_path / "cloud.obj"
    bad.write_text("v 0 0 0\n")
    with pytest.raises(ValueError, match="must be a .ply, .xyz or .npy"):
        sdf.read_points(str(bad))
    few = tmp_path / "few.npy"
    np.save(few, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="at least 16 points"):
        sdf.read_points(str(few))


def test_demo_command_on_a_user_cloud(tmp_path):
    g = torch.Generator().manual_seed(1)
    pts, _ = sdf.torus_surface(3000, g)
    path = tmp_path / "cloud.npy"
    np.save(path, (pts * 3 + 5).numpy())  # any placement and scale
    out_png = tmp_path / "slices.png"
    out = subprocess.run([sys.executable, "-m", "pointconv", "demo", "--points", str(path), "--steps", "20",
                          "--out", str(out_png)], capture_output=True, text=True, check=True)
    assert "| Chamfer to shape |" in out.stdout
    assert out_png.stat().st_size > 10_000
