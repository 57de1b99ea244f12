"""The demo's input files and options: PLY layouts read the right vertices, degenerate clouds and user
errors give clear messages (status 2, no traceback) before any training."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from example_scripts import load_example
from pointconv.demos import sdf

PTS = np.random.default_rng(0).random((40, 3)).astype(np.float32)
FACES = [[0, 1, 2], [2, 3, 4, 5], [6, 7, 8]]


def _ply(path, fmt, elements, body):
    head = ["ply", f"format {fmt} 1.0", "comment made by a test", *elements, "end_header"]
    path.write_bytes(("\n".join(head) + "\n").encode() + body)
    return path


def _ascii_faces():
    return "".join(f"{len(f)} " + " ".join(map(str, f)) + "\n" for f in FACES)


def _binary_faces(order):
    return b"".join(np.array([len(f)], order + "u1").tobytes() + np.array(f, order + "i4").tobytes() for f in FACES)


FACE_ELEMENT = [f"element face {len(FACES)}", "property list uchar int vertex_indices"]


def test_ascii_ply_with_faces_before_the_vertices(tmp_path):
    verts = "".join(f"{x} {y} {z}\n" for x, y, z in PTS)
    path = _ply(tmp_path / "a.ply", "ascii", FACE_ELEMENT + [f"element vertex {len(PTS)}", "property float x",
                                                              "property float y", "property float z"],
                (_ascii_faces() + verts).encode())
    np.testing.assert_array_equal(sdf._read_ply(path), PTS.astype(np.float64))


def test_ascii_ply_with_a_list_and_extra_properties_in_the_vertex_element(tmp_path):
    rows = "".join(f"{i % 3} " + "9 " * (i % 3) + f"{z} 5 {y} {x}\n" for i, (x, y, z) in enumerate(PTS))
    path = _ply(tmp_path / "a.ply", "ascii", [f"element vertex {len(PTS)}", "property list uchar float extra",
                                              "property float z", "property uchar red", "property float y",
                                              "property float x"] + FACE_ELEMENT,
                (rows + _ascii_faces()).encode())
    np.testing.assert_array_equal(sdf._read_ply(path), PTS.astype(np.float64))


@pytest.mark.parametrize("order", ["<", ">"])
def test_binary_ply_with_faces_first_and_a_list_before_x_y_z(tmp_path, order):
    fmt = "binary_little_endian" if order == "<" else "binary_big_endian"
    body = _binary_faces(order)
    for i, (x, y, z) in enumerate(PTS):  # vertex: list extra (i % 3 items), double x, y, z, ushort, int8 a
        body += np.array([i % 3], order + "u1").tobytes() + np.arange(i % 3, dtype=order + "f4").tobytes()
        body += np.array([x, y, z], order + "f8").tobytes() + np.array([7], order + "u2").tobytes() + b"\x01"
    path = _ply(tmp_path / "b.ply", fmt, FACE_ELEMENT + [
        f"element vertex {len(PTS)}", "property list uint8 float32 extra", "property float64 x",
        "property double y", "property double z", "property ushort w", "property int8 a"], body)
    np.testing.assert_array_equal(sdf._read_ply(path), PTS.astype(np.float64))


@pytest.mark.parametrize("order", ["<", ">"])
def test_binary_ply_fixed_size_elements_before_and_after(tmp_path, order):
    fmt = "binary_little_endian" if order == "<" else "binary_big_endian"
    cam = np.zeros(2, [("a", order + "f4"), ("b", order + "i2")]).tobytes()
    rec = np.zeros(len(PTS), [("r", "u1"), ("x", order + "f4"), ("y", order + "f4"), ("z", order + "f4")])
    rec["x"], rec["y"], rec["z"] = PTS.T
    path = _ply(tmp_path / "c.ply", fmt, ["element camera 2", "property float a", "property short b",
                                          f"element vertex {len(PTS)}", "property uchar r", "property float x",
                                          "property float y", "property float z"] + FACE_ELEMENT,
                cam + rec.tobytes() + _binary_faces(order))
    np.testing.assert_array_equal(sdf.read_points(str(path)).numpy(), PTS)


@pytest.mark.parametrize("case, message", [
    ("truncated", "truncated"), ("truncated-ascii", "truncated"), ("no-end-header", "end_header"),
    ("unknown-type", "unknown PLY property type 'half'"), ("no-vertex", "no vertex element"),
    ("no-xyz", "no x, y, z"), ("format", "format"), ("not-ply", "not a PLY file")])
def test_bad_ply_files_name_the_file(tmp_path, case, message):
    vertex = [f"element vertex {len(PTS)}", "property float x", "property float y", "property float z"]
    body = PTS.astype("<f4").tobytes()
    path = tmp_path / f"{case}.ply"
    if case == "truncated":
        _ply(path, "binary_little_endian", FACE_ELEMENT + vertex, _binary_faces("<") + body[:-4])
    elif case == "truncated-ascii":
        _ply(path, "ascii", vertex, "".join(f"{x} {y} {z}\n" for x, y, z in PTS[:-1]).encode())
    elif case == "no-end-header":
        path.write_bytes(b"ply\nformat binary_little_endian 1.0\n" + "\n".join(vertex).encode() + b"\n" + body)
    elif case == "unknown-type":
        _ply(path, "binary_little_endian", vertex + ["property half w"], body)
    elif case == "no-vertex":
        _ply(path, "binary_little_endian", FACE_ELEMENT, _binary_faces("<"))
    elif case == "no-xyz":
        _ply(path, "binary_little_endian", vertex[:3], body)
    elif case == "format":
        _ply(path, "binary_middle_endian", vertex, body)
    else:
        path.write_bytes(b"\x00\x01garbage end_header\n")
    with pytest.raises(ValueError, match=message) as info:
        sdf.read_points(str(path))
    assert str(path) in str(info.value)


def test_duplicated_points_are_dropped_in_order(tmp_path):
    path = tmp_path / "d.xyz"
    np.savetxt(path, np.repeat(PTS, 2, 0))
    np.testing.assert_allclose(sdf.read_points(str(path)).numpy(), PTS, rtol=1e-6)
    # and a model built on duplicated anchors (no read_points) gets a finite, positive spacing
    model = sdf.GaussianPointSDF(torch.from_numpy(np.repeat(PTS, 2, 0)))
    assert torch.isfinite(model.log_sigma).all()


@pytest.mark.parametrize("arr, message", [
    (np.ones((50, 3)), "zero extent"),
    (np.repeat(PTS[:10], 3, 0), "at least 16 distinct points"),
    (np.full((50, 3), np.nan), "NaN or Inf"),
    (np.savez, "an archive of arrays"),  # an .npz under an .npy name
    (np.ones((50, 3), bool), "dtype bool"),
    (np.ones((50, 3), complex), "dtype complex"),
])
def test_degenerate_npy_clouds_are_refused(tmp_path, arr, message):
    path = tmp_path / "c.npy"
    if arr is np.savez:
        with open(path, "wb") as fh:
            np.savez(fh, a=PTS)
    else:
        np.save(path, arr)
    with pytest.raises(ValueError, match=message):
        sdf.read_points(str(path))


def test_clouds_far_from_the_origin_keep_their_detail(tmp_path):
    # a torus of radius 5 in map coordinates (500 km east, 5,000 km north): rounded to float32
    # before centering, its y took 27 distinct values of 2,000 (float32 spacing 0.5 there)
    g = np.random.default_rng(1)
    t, u = g.random(2000) * 2 * np.pi, g.random(2000) * 2 * np.pi
    local = np.stack([(5 + np.cos(u)) * np.cos(t), (5 + np.cos(u)) * np.sin(t), np.sin(u)], 1)
    path = tmp_path / "utm.npy"
    np.save(path, local + [500_000.0, 5_000_000.0, 100.0])
    cloud = sdf.read_points(str(path))
    assert cloud.dtype == torch.float64
    fitted = sdf.normalize_cloud(cloud).float()  # what train() does: float64 first, then float32
    expect = torch.from_numpy((local - (local.min(0) + local.max(0)) / 2) / (np.ptp(local, 0).max() / 1.6))
    torch.testing.assert_close(fitted.double(), expect, rtol=0, atol=1e-6)
    # values past float32's range are fine too: centered and scaled in float64
    np.save(path, local * 1e300)
    assert torch.isfinite(sdf.normalize_cloud(sdf.read_points(str(path))).float()).all()
    # up to float64's largest: hi - lo and lo + hi overflowed (every point became 0, or -inf)
    # and down to subnormal coordinates (2^-1074 has no float64 reciprocal)
    for huge in (local * 2.9e307, local * 1.4e307 + 9e307, local * 2**-1050):
        assert np.isfinite(huge).all()
        torch.testing.assert_close(sdf.normalize_cloud(torch.from_numpy(huge)).float(), fitted, rtol=0, atol=1e-5)


def test_ply_with_carriage_return_line_ends(tmp_path):
    lines = ["ply", "format ascii 1.0", f"element vertex {len(PTS)}", "property float x", "property float y",
             "property float z", "end_header"] + [" ".join(f"{v:.6f}" for v in row) for row in PTS]
    path = tmp_path / "cr.ply"
    path.write_bytes("\r".join(lines).encode() + b"\r")
    np.testing.assert_allclose(sdf.read_points(str(path)).numpy(), PTS, atol=1e-6)


def test_normalize_cloud_refuses_a_single_point():
    with pytest.raises(ValueError, match="zero extent"):
        sdf.normalize_cloud(torch.ones(20, 3))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pointconv", *args], capture_output=True, text=True, timeout=120)


def test_user_errors_print_a_message_and_exit_2(tmp_path):
    ok = tmp_path / "ok.npy"
    np.save(ok, PTS)
    same = tmp_path / "same.xyz"
    np.savetxt(same, np.ones((50, 3)))
    cases = [(["--points", str(tmp_path / "missing.xyz")], "not found"),
             (["--points", str(tmp_path)], "must be a .ply"),
             (["--points", str(same)], "zero extent"),
             (["--device", "foo"], "not a device name"),
             (["--out", str(tmp_path / "no" / "x.png")], "does not exist"),
             (["--out", str(tmp_path / "x.jpgx")], "extension must be one of"),
             (["--out", str(tmp_path / "x.pgf")], "extension must be one of"),  # (needs LaTeX, after training)
             (["--points", ""], "--points is empty"),  # (it fitted the torus)
             (["--seed", str(2**70)], "expected a seed between")]  # (a traceback from torch.manual_seed)
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for args, message in cases:
        out = _cli("demo", "--points", str(ok), "--steps", "1", "--out", str(tmp_path / "o.png"), *args)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr and "error: " in out.stderr and message in out.stderr, (args, out.stderr)
        assert "fitting" not in out.stdout  # refused before the training
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("script, args", [
    ("sparse_unet_segmentation.py", ["--steps", "0"]), ("sparse_unet_segmentation.py", ["--batch", "-1"]),
    ("sparse_unet_segmentation.py", ["--out", "/nonexistent_dir/x.png"]),
    ("pointwise_cnn_classification.py", ["--batch", "0"]),
    ("pointwise_cnn_classification.py", ["--points", "0"]),
    ("pointwise_cnn_classification.py", ["--out", "x.jpgx"]),
    ("pointwise_cnn_classification.py", ["--seed", str(-2**64)]),
    ("sparse_unet_segmentation.py", ["--seed", str(2**63)]),
])
def test_examples_refuse_bad_options_before_training(capsys, script, args):
    example = load_example(script)
    with pytest.raises(SystemExit) as info:
        example.main(args)
    assert info.value.code == 2
    assert "error: " in capsys.readouterr().err
