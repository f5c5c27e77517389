import os

import torch

# Triton kernels reach CPU tensors only through its interpreter, which must be switched on before the
# kernels are imported. On a machine with a GPU the kernels are compiled for it instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def backend(monkeypatch):
    """Force SVNR_FAST_BACKEND for one test: `backend("triton")`."""
    def force(name: str) -> None:
        monkeypatch.setenv("SVNR_FAST_BACKEND", name)
    return force
