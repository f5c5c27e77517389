"""The CPU instruction sets the C++ kernels were compiled for that this CPU runs (svnr_fast._C.cpu_isas()).

`isa` is a fixture for the C++ kernel tests: a test that takes it runs once per set (baseline, avx2, avx512
on an AVX-512 machine), with the kernels switched to that set. Import it into a test module to use it.
"""
import pytest

from svnr_fast.ops import backends

_EXT = backends.extension()[0]
ISAS = _EXT.cpu_isas().split(", ") if _EXT is not None else []
requires_extension = pytest.mark.skipif(_EXT is None, reason="svnr_fast._C is not built")


@pytest.fixture(params=ISAS or [pytest.param(None, marks=requires_extension)])
def isa(request):
    before = _EXT.cpu_isa()
    _EXT.set_cpu_isa(request.param)
    yield request.param
    _EXT.set_cpu_isa(before)
