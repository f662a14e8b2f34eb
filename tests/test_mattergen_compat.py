"""The pure-PyTorch torch_scatter / torch_sparse stand-ins against brute-force references.

Needs only torch, so it runs in the main environment too (the module imports nothing else).
"""

from __future__ import annotations

import pytest
import torch

from cscflow.mattergen_worker import compat


def _rng(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("reduce", ["sum", "add", "mean", "max", "min"])
def test_scatter_matches_loop(reduce):
    g = _rng(1)
    src = torch.randn(50, 3, generator=g)
    index = torch.randint(0, 7, (50,), generator=g)
    out = compat.scatter(src, index, dim=0, dim_size=9, reduce=reduce)
    assert out.shape == (9, 3)
    for k in range(9):
        rows = src[index == k]
        if rows.numel() == 0:
            expected = torch.zeros(3)  # torch_scatter leaves empty slots at 0
        elif reduce in ("sum", "add"):
            expected = rows.sum(0)
        elif reduce == "mean":
            expected = rows.mean(0)
        elif reduce == "max":
            expected = rows.max(0).values
        else:
            expected = rows.min(0).values
        torch.testing.assert_close(out[k], expected)


def test_scatter_default_size_last_dim_and_add():
    src = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    idx = torch.tensor([0, 2, 2, 0])
    out = compat.scatter_add(src, idx.view(1, -1))
    assert out.tolist() == [[5.0, 0.0, 5.0]]
    with pytest.raises(ValueError, match="unsupported reduce"):
        compat.scatter(src, idx, reduce="median")


def test_segment_csr_and_coo():
    g = _rng(2)
    src = torch.randn(12, 2, generator=g)
    indptr = torch.tensor([0, 3, 3, 8, 12])
    out = compat.segment_csr(src, indptr, reduce="sum")
    expected = torch.stack([src[0:3].sum(0), torch.zeros(2), src[3:8].sum(0), src[8:12].sum(0)])
    torch.testing.assert_close(out, expected)
    sizes = torch.tensor([3, 1, 4])
    counts = compat.segment_csr(sizes, torch.tensor([0, 2, 3]), reduce="sum")
    assert counts.tolist() == [4, 4]
    index = torch.tensor([0, 0, 1, 3, 3, 3])
    coo = compat.segment_coo(torch.ones(6), index, dim_size=5)
    assert coo.tolist() == [2.0, 1.0, 0.0, 3.0, 0.0]


def test_sparse_tensor_row_selection_matches_dense():
    """GemNet's triplets: adj[idx_t].storage.value()/row() for a random multigraph."""
    g = _rng(3)
    n_atoms, n_edges = 6, 40
    row = torch.randint(0, n_atoms, (n_edges,), generator=g)  # targets (with duplicates)
    col = torch.randint(0, n_atoms, (n_edges,), generator=g)
    value = torch.arange(n_edges)
    adj = compat.SparseTensor(row=row, col=col, value=value, sparse_sizes=(torch.tensor(n_atoms),) * 2)
    idx = row.clone()
    sel = adj[idx].to("cpu")
    new_row, val = sel.storage.row(), sel.storage.value()
    # rows come out grouped and sorted (GemNet's ragged_range relies on it)
    assert torch.all(new_row[1:] >= new_row[:-1])
    for k, atom in enumerate(idx.tolist()):
        got = sorted(val[new_row == k].tolist())
        assert got == sorted(value[row == atom].tolist())
    # inside a row the entries are ordered by column, as torch_sparse sorts them
    for k in range(len(idx)):
        cols = sel.storage.col()[new_row == k]
        assert torch.all(cols[1:] >= cols[:-1])
    with pytest.raises(TypeError):
        adj[0]


def test_install_registers_only_when_absent(monkeypatch):
    import importlib.util
    import sys

    have = importlib.util.find_spec("torch_scatter") is not None
    monkeypatch.setattr(compat, "INSTALLED", False)
    for name in ("torch_scatter", "torch_sparse"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    registered = compat.install()
    assert registered is (not have)
    if registered:
        import torch_scatter
        import torch_sparse

        assert torch_scatter.scatter is compat.scatter
        assert torch_sparse.SparseTensor is compat.SparseTensor
    for name in ("torch_scatter", "torch_sparse"):
        monkeypatch.delitem(sys.modules, name, raising=False)
