"""The README's code runs, and .ci/run runs the README's test command."""
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) == 4
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["nbr"].shape == (2, 500, 32, 32)
    assert scope["centers"].shape == (2, 1024)
    scope = {}
    exec(compile(blocks[1], "README.md", "exec"), scope)
    assert scope["f_out"].shape == (2, 1000, 32) and scope["idxs"].dtype.is_floating_point is False
    assert scope["p"].grad is None and scope["q"].grad is not None
    scope = {}
    exec(compile(blocks[2], "README.md", "exec"), scope)
    assert scope["y"].spatial_shape == [16, 16, 16] and scope["y"].features.shape[1] == 64
    scope = {}
    exec(compile(blocks[3], "README.md", "exec"), scope)
    torch.testing.assert_close(scope["same"], scope["mean"])
    assert scope["z"].shape == (2, 512, 64) and scope["e"].shape == (2, 2048, 32)
    assert scope["pw"].shape == (2, 2048, 9)


def test_quickstart_has_two_commands_and_ci_runs_the_test_one():
    quick = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quick, flags=re.S)
    assert len(commands) == 2
    assert "pointconv demo" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci  # .ci/run reads the command from the README, not a copy of it
