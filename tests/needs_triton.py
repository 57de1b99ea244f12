"""Module-level skip for the kernel tests where the installed Triton is missing or older than the
kernels need (``pointconv._backend.MIN_TRITON``): there pointconv never runs them either (CUDA
tensors take the torch backend), so there is nothing to test."""
import pytest

from pointconv._backend import MIN_TRITON, dotted, triton_available, triton_version_string


def require_triton() -> None:
    if not triton_available():
        found = triton_version_string() or "none installed"
        pytest.skip(f"the kernels need Triton >= {dotted(MIN_TRITON)} (found: {found})",
                    allow_module_level=True)
