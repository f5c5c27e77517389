"""The compiled module svnr_fast._C, when it was built: loaded on first use, never at import."""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def module():
    """(svnr_fast._C, None), or (None, why it could not be loaded)."""
    try:
        from . import _C
    except ImportError as err:
        return None, f"{type(err).__name__}: {err}"
    return _C, None
