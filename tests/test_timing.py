"""The benchmarks' timing helper."""
import weakref

from pointconv._timing import timed_ms


class _Result:
    pass


def test_each_run_starts_with_the_previous_result_released():
    """A held result would keep its graph (a forward's neighbor structures) alive while the next run
    allocates its own: the runs would measure page faults no training loop pays."""
    alive_at_start, results = [], []

    def run():
        alive_at_start.append(bool(results) and results[-1]() is not None)
        result = _Result()
        results.append(weakref.ref(result))
        return result

    ms, out = timed_ms(run, "cpu", repeat=3, warmup=2)
    assert alive_at_start == [False] * 5
    assert results[-1]() is out and len(results) == 5 and ms >= 0


def test_provenance_names_pointconvs_commit_from_any_directory(tmp_path, monkeypatch):
    """The tables' commit is the checkout pointconv runs from, not the current directory's
    (``python -m pointconv bench`` from another git repository recorded that repository's)."""
    import pathlib
    import subprocess

    from pointconv._timing import provenance

    source = pathlib.Path(__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=source)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)  # a repository without commits: git rev-parse fails here
    line = provenance("test", "cpu")
    if head.returncode == 0:  # (a source tree without git records "unknown" either way)
        assert f"commit {head.stdout.strip()}," in line
    # a copy of the package inside another repository (a project's .venv) is no checkout of pointconv
    import os
    import shutil
    import sys

    site = tmp_path / ".venv" / "site-packages"
    shutil.copytree(source.parent / "src" / "pointconv", site / "pointconv", ignore=shutil.ignore_patterns("__pycache__"))
    env = {"user.email": "a@b", "user.name": "x"}
    subprocess.run(["git", *sum((["-c", f"{k}={v}"] for k, v in env.items()), []), "commit", "-q", "--allow-empty",
                    "-m", "other"], cwd=tmp_path, check=True)
    out = subprocess.run([sys.executable, "-c", "import pointconv._timing as t; print(t.provenance('x', 'cpu'))"],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)})
    assert "commit unknown," in out.stdout, out.stderr
