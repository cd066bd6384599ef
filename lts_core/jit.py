"""The project's one way to compile a per-weight loop with numba (house rules in docs/ARCHITECTURE.md).

`kernel(fn)` is `numba.njit(cache=True, nogil=True)`: compiled on first call (or loaded from numba's on-disk
cache next to the module, `__pycache__/*.nbi|nbc`, in well under a second), the GIL released while it runs so our
own threads run kernels on disjoint slices at once. Never `parallel=True` (numba's threading layers are not
safe when two Python threads call a parallel kernel at once, and fight torch's OpenMP) and never `fastmath`
(results must stay bit for bit those of the numpy/torch definitions; a Python float constant is float64 and
promotes float32 arithmetic, so kernels take their float32 constants as arguments or cast with np.float32).

Import this module only from the modules that hold kernels, and import those lazily (inside the function that
runs them): importing numba takes about 0.3 s and must not be paid by `import lts_core` or by an app page's first
view of a cached run.
"""
from __future__ import annotations

import numba

OPTIONS = {"cache": True, "nogil": True}


def kernel(fn):
    """`fn` compiled with the house options (`OPTIONS`)."""
    return numba.njit(**OPTIONS)(fn)


__all__ = ["OPTIONS", "kernel"]
