import os

import torch

# Triton kernels reach CPU tensors only through its interpreter, which must be switched on before the
# kernels are imported. On a machine with a GPU the kernels are compiled for it instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def backend():
    """Force a backend for one test, as SVNR_FAST_BACKEND does: `backend("triton")`; `backend("auto")` the
    automatic choice."""
    from svnr_fast.ops import backends
    before = backends.forced()
    yield backends.set_backend
    backends.set_backend(before)


@pytest.fixture
def fused_cpu(backend):
    """The C++ kernels forced for CPU tensors: a test that compares svnr_fast.ops with the reference on the CPU
    then cannot compare the reference with itself (skipped where the extension is not built)."""
    from svnr_fast.ops import backends
    module, error = backends.extension()
    if module is None:
        pytest.skip(f"the C++ kernels are not built here ({error})")
    backend("cpp")


@pytest.fixture
def impl(request):
    """The parametrised implementation (svnr_fast.reference or svnr_fast.ops); ops run on the C++ kernels."""
    from svnr_fast import ops
    if request.param is ops:
        request.getfixturevalue("fused_cpu")
    return request.param


@pytest.fixture(autouse=True)
def fresh_backend_choices():
    """Each test chooses backends anew: tests change the machine's state (a missing extension, TRITON_INTERPRET)."""
    from svnr_fast.ops import backends
    backends.forget_choices()
    yield
    backends.forget_choices()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    they gain nothing from threads, and on a loaded 2-core machine OpenMP threads spin against each other
    (a tiny training step: 20 ms with one thread, over a second with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
