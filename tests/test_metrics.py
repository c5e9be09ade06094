import math

import pytest
import torch

from shira_diffusion import AdapterError, SparseAdapter, SparseDelta, interference
from shira_diffusion.metrics import weight_interference

KEY = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"


def delta(entries: dict[tuple[int, int], float], shape=(4, 5)) -> SparseDelta:
    flat = sorted((r * shape[1] + c, v) for (r, c), v in entries.items())
    return SparseDelta(torch.tensor([i for i, _ in flat]), torch.tensor([v for _, v in flat]), shape)


def test_disjoint_rows_do_not_interfere():
    a = delta({(0, 0): 1.0, (0, 3): 2.0})
    b = delta({(1, 0): 5.0, (2, 4): -1.0})
    m = weight_interference(a, b)
    assert m == {"shared": 0, "overlap": 0.0, "awom": 0.0, "awor": 1.0}


def test_single_shared_entry_gives_known_awom_and_awor():
    a = delta({(2, 1): 3.0})
    b = delta({(2, 1): -2.0, (3, 4): 1.0})
    m = weight_interference(a, b)
    # dW1^T dW2 has one non-zero: column 1 of dW1 (3 at row 2) dot column 1 of dW2 (-2 at row 2)
    assert m["shared"] == 1 and m["overlap"] == 1.0
    assert m["awom"] == pytest.approx(6.0)
    assert m["awor"] == pytest.approx(1 - 1 / 25)


def test_awom_is_spectral_norm_of_product():
    g = torch.Generator().manual_seed(0)
    shape = (30, 20)
    ia = torch.randperm(600, generator=g)[:90].sort().values
    ib = torch.randperm(600, generator=g)[:90].sort().values
    a = SparseDelta(ia, torch.randn(90, generator=g), shape)
    b = SparseDelta(ib, torch.randn(90, generator=g), shape)
    m = weight_interference(a, b)
    p = a.to_dense().T @ b.to_dense()
    assert m["awom"] == pytest.approx(float(torch.linalg.svdvals(p.double())[0]), rel=1e-5)
    assert m["shared"] == len(set(ia.tolist()) & set(ib.tolist()))


def test_aggregate_pools_overlap_and_averages_awom_awor():
    a = SparseAdapter({KEY: delta({(0, 0): 1.0, (1, 1): 1.0}), "unet.only_a": delta({(0, 0): 1.0})})
    b = SparseAdapter({KEY: delta({(0, 0): 2.0, (3, 3): 1.0, (3, 4): 1.0}), "unet.only_b": delta({(0, 0): 1.0})})
    out = interference(a, b)
    agg = out["aggregate"]
    assert list(out["per_weight"]) == [KEY]
    assert agg["weights_shared"] == 1 and agg["weights_only_a"] == 1 and agg["weights_only_b"] == 1
    assert agg["overlap"] == 0.5  # 1 shared of the smaller side's 2
    assert agg["awom"] == pytest.approx(2.0)
    assert out["by_component"] == {"unet": {k: agg[k] for k in ("weights_shared", "overlap", "awom", "awor")}}


def test_shape_mismatch_is_an_adapter_error():
    with pytest.raises(AdapterError, match="cannot compare"):
        weight_interference(delta({(0, 0): 1.0}), delta({(0, 0): 1.0}, shape=(5, 4)))


@pytest.mark.parametrize("kind", ["sparse", "lora-sparse", "lora-lora", "conv"])
def test_lanczos_awom_and_sparse_awor_agree_with_the_dense_svd(kind):
    """Above 64 columns AWOM is a Lanczos estimate on the factors and AWOR comes from a sparse
    product: both against the dense computation they replace."""
    from shira_diffusion import LoraDelta

    g = torch.Generator().manual_seed(1)
    shape = (8, 12, 3, 3) if kind == "conv" else (150, 200)
    numel, rows = math.prod(shape), shape[0]

    def sparse(n):
        idx = torch.randperm(numel, generator=g)[:n].sort().values
        return SparseDelta(idx, torch.randn(n, generator=g), shape)

    def lora():
        return LoraDelta(torch.randn(4, numel // rows, generator=g), torch.randn(rows, 4, generator=g), 0.5, shape)

    a, b = {"sparse": (sparse(900), sparse(900)), "conv": (sparse(120), sparse(120)),
            "lora-sparse": (lora(), sparse(900)), "lora-lora": (lora(), lora())}[kind]
    dense = lambda d: (d.dense() if isinstance(d, LoraDelta) else d.to_dense(torch.float32)).reshape(rows, -1).double()  # noqa: E731
    product = dense(a).T @ dense(b)
    m = weight_interference(a, b)
    assert m["awom"] == pytest.approx(float(torch.linalg.svdvals(product)[0]), rel=1e-5)
    assert m["awor"] == 1.0 - int(torch.count_nonzero(product.float())) / product.numel()
