"""Pure-PyTorch stand-ins for the parts of ``torch_scatter`` / ``torch_sparse`` mattergen uses.

Both packages are source-only on PyPI (compiling them took ~75 min here). mattergen only calls
``torch_scatter.{scatter, scatter_add, segment_csr, segment_coo}`` and
``torch_sparse.SparseTensor(row, col, value, sparse_sizes)[idx].storage.{row, value}()``
(GemNet's triplet construction). :func:`install` registers these replacements in
``sys.modules`` only when the compiled packages are absent, and must run before mattergen is
imported; on GPU clusters the compiled wheels are used (docs/mattergen.md).
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch

__all__ = ["INSTALLED", "SparseTensor", "install", "scatter", "scatter_add", "segment_coo", "segment_csr"]

#: True once :func:`install` registered the pure-PyTorch modules
INSTALLED = False

_REDUCE = {"sum": "sum", "add": "sum", "mean": "mean", "max": "amax", "min": "amin", "mul": "prod"}


def _broadcast(index: torch.Tensor, src: torch.Tensor, dim: int) -> torch.Tensor:
    """torch_scatter's index broadcasting: a 1-D index runs along ``dim`` of ``src``."""
    if index.dim() == 1 and src.dim() > 1:
        shape = [1] * src.dim()
        shape[dim] = -1
        index = index.view(shape)
    return index.expand_as(src)


def scatter(
    src: torch.Tensor,
    index: torch.Tensor,
    dim: int = -1,
    out: torch.Tensor | None = None,
    dim_size: int | None = None,
    reduce: str = "sum",
) -> torch.Tensor:
    """Reduce ``src`` into ``dim_size`` slots along ``dim`` (empty slots are 0, as torch_scatter)."""
    if reduce not in _REDUCE:
        raise ValueError(f"scatter: unsupported reduce {reduce!r} (one of {sorted(_REDUCE)})")
    dim = dim % src.dim() if src.dim() else 0
    index = _broadcast(index, src, dim)
    if dim_size is None:
        dim_size = int(index.max()) + 1 if index.numel() else 0
    size = list(src.shape)
    size[dim] = int(dim_size)
    if out is None:
        out = torch.zeros(size, dtype=src.dtype, device=src.device)
        include_self = False
    else:
        include_self = True
    return out.scatter_reduce(dim, index, src, reduce=_REDUCE[reduce], include_self=include_self)


def scatter_add(src, index, dim=-1, out=None, dim_size=None):
    return scatter(src, index, dim=dim, out=out, dim_size=dim_size, reduce="sum")


def segment_coo(src, index, out=None, dim_size=None, reduce="sum"):
    """Reduce over runs of a sorted ``index`` (the last index dimension)."""
    return scatter(src, index, dim=index.dim() - 1, out=out, dim_size=dim_size, reduce=reduce)


def segment_csr(src, indptr, out=None, reduce="sum"):
    """Reduce ``src[indptr[i]:indptr[i+1]]`` along the first dimension (1-D indptr)."""
    if indptr.dim() != 1:
        raise ValueError("segment_csr: only a 1-D indptr is supported by the compatibility module")
    counts = indptr[1:] - indptr[:-1]
    start, stop = int(indptr[0]), int(indptr[-1])
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=src.device), counts)
    return scatter(src[start:stop], seg, dim=0, out=out, dim_size=counts.numel(), reduce=reduce)


class _Storage:
    def __init__(self, row, col, value, sizes):
        self._row, self._col, self._value, self._sizes = row, col, value, sizes

    def row(self):
        return self._row

    def col(self):
        return self._col

    def value(self):
        return self._value

    def sparse_sizes(self):
        return self._sizes


class SparseTensor:
    """COO matrix sorted by (row, col); ``adj[idx]`` selects rows, renumbered 0..len(idx)-1."""

    def __init__(self, row, col, value=None, sparse_sizes=None, is_sorted=False, **_):
        n_rows = int(sparse_sizes[0]) if sparse_sizes is not None else int(row.max()) + 1
        n_cols = int(sparse_sizes[1]) if sparse_sizes is not None else int(col.max()) + 1
        if not is_sorted and row.numel():
            perm = torch.argsort(col, stable=True)
            perm = perm[torch.argsort(row[perm], stable=True)]
            row, col = row[perm], col[perm]
            value = value[perm] if value is not None else None
        self.storage = _Storage(row, col, value, (n_rows, n_cols))

    def sparse_sizes(self):
        return self.storage.sparse_sizes()

    def to(self, device):
        s = self.storage
        value = s.value().to(device) if s.value() is not None else None
        out = SparseTensor.__new__(SparseTensor)
        out.storage = _Storage(s.row().to(device), s.col().to(device), value, s.sparse_sizes())
        return out

    def index_select_rows(self, idx: torch.Tensor) -> "SparseTensor":
        s = self.storage
        n_rows = s.sparse_sizes()[0]
        deg = torch.bincount(s.row(), minlength=n_rows)
        rowptr = torch.zeros(n_rows + 1, dtype=torch.long, device=deg.device)
        rowptr[1:] = torch.cumsum(deg, 0)
        counts = deg[idx]
        new_row = torch.repeat_interleave(torch.arange(idx.numel(), device=idx.device), counts)
        # position of each selected entry: start of its row + rank inside the row
        starts = torch.repeat_interleave(rowptr[idx], counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        pos = starts + torch.arange(new_row.numel(), device=idx.device) - first
        value = s.value()[pos] if s.value() is not None else None
        out = SparseTensor.__new__(SparseTensor)
        out.storage = _Storage(new_row, s.col()[pos], value, (idx.numel(), s.sparse_sizes()[1]))
        return out

    def __getitem__(self, idx):
        if not isinstance(idx, torch.Tensor) or idx.dtype == torch.bool or idx.dim() != 1:
            raise TypeError("SparseTensor compatibility: only a 1-D integer row index is supported")
        return self.index_select_rows(idx.long())


def install(force: bool = False) -> bool:
    """Register the replacements unless the compiled packages exist; True if registered.

    torch_geometric is imported first so that it records the compiled packages as absent
    and never calls their custom ops through these pure-PyTorch modules.
    """
    global INSTALLED
    if INSTALLED:
        return True
    have = importlib.util.find_spec("torch_scatter") is not None and importlib.util.find_spec(
        "torch_sparse"
    ) is not None
    if have and not force:
        return False
    try:
        import torch_geometric  # noqa: F401
    except ImportError:
        pass
    mod_scatter = types.ModuleType("torch_scatter")
    mod_scatter.__doc__ = "cscflow pure-PyTorch stand-in (mattergen_worker.compat)"
    for name in ("scatter", "scatter_add", "segment_coo", "segment_csr"):
        setattr(mod_scatter, name, globals()[name])
    mod_sparse = types.ModuleType("torch_sparse")
    mod_sparse.__doc__ = mod_scatter.__doc__
    mod_sparse.SparseTensor = SparseTensor
    sys.modules["torch_scatter"] = mod_scatter
    sys.modules["torch_sparse"] = mod_sparse
    INSTALLED = True
    return True
