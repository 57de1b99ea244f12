import os
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "pointconv", *args], capture_output=True, text=True, check=True).stdout


def test_info_lists_versions_and_backends():
    out = _run("info")
    assert "pointconv 0.1.0" in out and "torch " in out
    assert "| knn / ball_query / NeighborIndex, float32 | torch (scipy cKDTree" in out


def test_neighbor_demo_prints_its_table():
    out = _run("demo", "neighbors", "--points", "3000", "--k", "8")
    for op in ("knn (self, exclude_self)", "ball_query", "NeighborIndex.knn", "farthest_point_sample",
               "grid_subsample", "gather"):
        assert f"| {op}" in out
    assert "FPS picked 1,024 points per cloud, all distinct" in out
    # clouds of fewer than 4 points still get queries (it printed a NaN share of filled slots, and
    # counted both clouds' samples as "distinct points")
    out = _run("demo", "neighbors", "--points", "2", "--k", "1")
    assert "nan" not in out and "FPS picked 2 points per cloud, all distinct" in out


def test_subcommand_help_lists_the_subcommand_options():
    for args, options in [(["demo", "--help"], ["--steps", "--points", "--out", "--device"]),
                          (["demo", "neighbors", "--help"], ["--points", "--k", "--device"]),
                          (["bench", "--help"], ["--sizes", "--repeat", "--batches", "--fps"])]:
        out = _run(*args)
        assert all(o in out for o in options), (args, out)


def test_info_refuses_extra_arguments():
    out = subprocess.run([sys.executable, "-m", "pointconv", "info", "extra"], capture_output=True, text=True)
    assert out.returncode == 2 and "info takes no arguments" in out.stderr
    assert "usage: python -m pointconv info" in _run("info", "--help")  # (it was refused as an argument)
    # a bad POINTCONV_BACKEND is reported by the diagnostic command, not as a traceback
    env = {**os.environ, "POINTCONV_BACKEND": "bogus"}
    out = subprocess.run([sys.executable, "-m", "pointconv", "info"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "POINTCONV_BACKEND must be one of" in out.stderr


def test_bench_refuses_bad_options_before_any_work():
    # each was a traceback from inside the benchmark (topk, statistics, a CUDA call, ...)
    cases = [(["--k", "0"], "--k: expected an integer >= 1"), (["--repeat", "0"], "--repeat: expected"),
             (["--sizes", "-5"], "--sizes: expected"), (["--batches", "2x0"], "joined by x"),
             (["--k", "200", "--sizes", "100"], "larger than the smallest cloud"),
             (["--sizes", "--batches", "--dims", "1x8x16"], "larger than the smallest cloud (8 points)"),
             (["--device", "foo"], "not a device name")]
    for args, message in cases:
        out = subprocess.run([sys.executable, "-m", "pointconv", "bench", *args], capture_output=True, text=True)
        assert out.returncode == 2 and "Traceback" not in out.stderr and message in out.stderr, (args, out.stderr)
        assert "python -m pointconv bench: error:" in out.stderr  # (not the script's file name)
