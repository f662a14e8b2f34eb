"""One thread count for every stage, in every process that runs one.

The user's setting is ``OMP_NUM_THREADS`` (the ``cscflow`` commands default it to 1).
It does not hold by itself: numba's OpenMP threading layer (QUESTS' kernel sums, the
first entropy stage) starts its pool with ``NUMBA_NUM_THREADS`` threads (default: all
cores) and calls ``omp_set_num_threads`` on the libgomp that PyTorch shares, so every
later PyTorch stage of the process ran on all cores: other floating-point sums (a
resumed or FireWorks run differed from a straight one) and 5-25x slower relaxations on
a loaded machine. :func:`prepare` gives numba the same count before it is imported, and
:func:`pinned` (entered by :func:`cscflow.checkpoint.resumable` around every stage) sets
PyTorch and numba to it before and after the stage, whatever ran earlier.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

__all__ = ["apply", "configured", "pinned", "prepare"]


def configured() -> int:
    """The thread count the user asked for: ``OMP_NUM_THREADS``, else 1 (the CLI default)."""
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", "1").split(",")[0])
    except ValueError:
        return 1
    return max(value, 1)


def prepare() -> int:
    """Fill ``OMP_NUM_THREADS``/``NUMBA_NUM_THREADS`` in the environment before the libraries
    read them (torch and numba read them once, at import)."""
    n = configured()
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    os.environ.setdefault("NUMBA_NUM_THREADS", str(n))
    return n


def apply(n: int | None = None) -> int:
    """Set the already-imported PyTorch and numba to `n` threads (default: :func:`configured`)."""
    n = configured() if n is None else n
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads") and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    numba = sys.modules.get("numba")
    if numba is not None and hasattr(numba, "set_num_threads"):
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return n


@contextmanager
def pinned():
    """Run the block with the configured thread count and leave it so afterwards."""
    n = apply()
    try:
        yield n
    finally:
        apply(n)
