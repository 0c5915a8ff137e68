"""Optional compilation of the control plane's hot loops with numba.

`njit(fn)` returns numba's compiled function when numba is installed (and MOELESS_NO_JIT is not set), else `fn`
itself: the same code runs as plain Python, slower but identical in results (the tests run both). The loops
are written for numba's subset of Python: scalars and numpy arrays, no objects.

Why numba: the policy decides every MoE layer of every iteration (Mixtral: 32 layers per decode step) within a
budget of microseconds per layer; numpy's per-call overhead (~1 us x hundreds of calls) cannot get there for
greedy loops over a few hundred replicas, and a C extension would need a compiler on every user's machine.
"""
from __future__ import annotations

import os

__all__ = ["HAVE_NUMBA", "njit"]

try:
    if os.environ.get("MOELESS_NO_JIT", "") not in ("", "0"):
        raise ImportError("MOELESS_NO_JIT is set")
    import numba as _numba

    HAVE_NUMBA = True
except ImportError:
    _numba = None
    HAVE_NUMBA = False


def njit(fn):
    """Compile `fn` with numba (nopython mode, cached on disk) when available; else return it unchanged."""
    if _numba is None:
        return fn
    return _numba.njit(cache=True, nogil=True)(fn)
