import subprocess
import sys

import pytest
import torch

import pointconv
from pointconv._backend import backend_for, forced_backend


def test_defaults_and_forcing(monkeypatch):
    monkeypatch.delenv("POINTCONV_BACKEND", raising=False)
    assert backend_for(torch.device("cpu")) == "torch"
    with pointconv.use_backend("reference"):
        assert backend_for(torch.device("cpu")) == "reference"
        with pointconv.use_backend("torch"):
            assert backend_for(torch.device("cpu")) == "torch"
        assert backend_for(torch.device("cpu")) == "reference"
    assert forced_backend() is None
    monkeypatch.setenv("POINTCONV_BACKEND", "reference")
    assert backend_for(torch.device("cpu")) == "reference"
    with pointconv.use_backend("torch"):  # the context manager wins over the variable
        assert backend_for(torch.device("cpu")) == "torch"
    monkeypatch.setenv("POINTCONV_BACKEND", "fast")
    with pytest.raises(ValueError, match="POINTCONV_BACKEND must be one of"):
        backend_for(torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        with pointconv.use_backend("cuda"):
            pass


def test_triton_forced_on_cpu_needs_the_interpreter(monkeypatch):
    from pointconv import _backend

    monkeypatch.setattr(_backend, "triton_version", lambda: _backend.MIN_TRITON)  # whatever is installed
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pointconv.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            backend_for(torch.device("cpu"))


def test_env_var_selects_the_reference_in_a_fresh_process():
    code = ("import torch, pointconv; from pointconv._backend import backend_for;"
            "print(backend_for(torch.device('cpu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "POINTCONV_BACKEND": "reference"})
    assert out.stdout.strip() == "reference"


def test_cuda_takes_triton_only_from_the_version_that_compiles_every_kernel(monkeypatch):
    from pointconv import _backend

    monkeypatch.delenv("POINTCONV_BACKEND", raising=False)
    cuda = torch.device("cuda")  # backend_for reads only the device type: no GPU needed
    for version, expected in [(None, "torch"), ((3, 0), "torch"), ((3, 4), "torch"), ((3, 5), "triton"),
                              ((3, 9), "triton"), ((4, 0), "triton")]:
        monkeypatch.setattr(_backend, "triton_version", lambda v=version: v)
        assert backend_for(cuda) == expected, version
        assert backend_for(torch.device("cpu")) == "torch"
    monkeypatch.setattr(_backend, "triton_version", lambda: (3, 4))
    with pointconv.use_backend("triton"):
        with pytest.raises(RuntimeError, match=r"needs Triton >= 3\.5 \(Triton 3\.4 is installed\)"):
            backend_for(cuda)
    monkeypatch.setattr(_backend, "triton_version", lambda: None)
    with pointconv.use_backend("triton"):
        with pytest.raises(RuntimeError, match="Triton is not installed"):
            backend_for(cuda)


def test_triton_version_reads_the_installed_package():
    triton = pytest.importorskip("triton")
    from pointconv._backend import triton_version

    assert triton_version() == tuple(int(x) for x in triton.__version__.split(".")[:2])
