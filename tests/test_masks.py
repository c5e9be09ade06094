import pytest
import torch

from shira_diffusion import budget, calibration_scores, make_mask, make_masks
from shira_diffusion.masks import make_masks, struct_mask, struct_shift, struct_stride


def weight(rows=48, cols=80, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_budget_from_density_and_rank():
    assert budget((100, 50), density=0.01) == 50
    assert budget((100, 50), density=0.013) == 65
    assert budget((100, 50), rank=4) == 4 * 150
    assert budget((10, 10), rank=8) == 100  # capped at numel
    assert budget((640, 2048), rank=16) == 16 * 2688
    assert budget((8, 3, 3, 3), rank=2) == 2 * (8 + 27)  # conv: rows x (in * kh * kw)


@pytest.mark.parametrize(
    "kwargs,message",
    [({}, "exactly one"), ({"density": 0.1, "rank": 2}, "exactly one"), ({"density": 0.0}, "density"), ({"rank": 0}, "rank")],
)
def test_budget_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        budget((4, 4), **kwargs)


@pytest.mark.parametrize("kind", ["rand", "wm", "grad", "snip"])
@pytest.mark.parametrize("spec", [{"density": 0.02}, {"density": 0.3}, {"rank": 3}])
def test_exact_counts_sorted_unique(kind, spec):
    w = weight()
    idx = make_mask(w, kind, scores=weight(seed=9).abs(), **spec)
    assert idx.numel() == budget(w.shape, **spec)
    assert idx.dtype == torch.int64
    assert bool((torch.diff(idx) > 0).all()) and int(idx[0]) >= 0 and int(idx[-1]) < w.numel()


@pytest.mark.parametrize("kind", ["rand", "wm", "grad", "snip", "struct"])
def test_deterministic_for_a_seed(kind):
    w, s = weight(), weight(seed=4).abs()
    a = make_mask(w, kind, density=0.1, seed=7, scores=s)
    b = make_mask(w.clone(), kind, density=0.1, seed=7, scores=s.clone())
    assert torch.equal(a, b)


def test_rand_depends_on_seed_and_key():
    w = weight()
    assert not torch.equal(make_mask(w, "rand", density=0.1, seed=1), make_mask(w, "rand", density=0.1, seed=2))
    masks = make_masks({"unet.a": w, "unet.b": w}, "rand", density=0.1, seed=1)
    assert not torch.equal(masks["unet.a"], masks["unet.b"])
    assert torch.equal(masks["unet.a"], make_masks({"unet.a": w}, "rand", density=0.1, seed=1)["unet.a"])


def test_wm_picks_the_largest_magnitudes():
    w = weight()
    idx = make_mask(w, "wm", density=0.05)
    chosen = torch.zeros(w.numel(), dtype=torch.bool)
    chosen[idx] = True
    mags = w.abs().view(-1)
    assert mags[chosen].min() >= mags[~chosen].max()


@pytest.mark.parametrize("kind", ["grad", "snip"])
def test_grad_and_snip_pick_the_largest_scores(kind):
    w, g = weight(), weight(seed=5)
    idx = make_mask(w, kind, rank=2, scores=g)
    score = (g.abs() if kind == "grad" else (g * w).abs()).view(-1)
    chosen = torch.zeros(w.numel(), dtype=torch.bool)
    chosen[idx] = True
    assert score[chosen].min() >= score[~chosen].max()


def test_grad_needs_scores():
    with pytest.raises(ValueError, match="needs gradient scores"):
        make_mask(weight(), "grad", density=0.1)
    with pytest.raises(ValueError, match="does not match"):
        make_mask(weight(), "snip", density=0.1, scores=torch.ones(3, 3))
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_mask(weight(), "topk", density=0.1)


def test_calibration_scores_accumulate_absolute_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4, bias=False).requires_grad_(False)
    batches = [torch.randn(3, 6) for _ in range(3)]

    def loss_fn(x):
        return (lin(x) ** 2).sum()

    scores = calibration_scores({"unet.lin": lin.weight}, loss_fn, batches)
    expected = torch.zeros(4, 6)
    for x in batches:
        w = lin.weight.detach().clone().requires_grad_(True)
        ((x @ w.T) ** 2).sum().backward()
        expected += w.grad.abs()
    assert torch.allclose(scores["unet.lin"], expected, rtol=1e-6, atol=0)
    assert not lin.weight.requires_grad and lin.weight.grad is None
    idx = make_mask(lin.weight, "grad", density=0.25, scores=scores["unet.lin"])
    assert torch.equal(idx, torch.topk(expected.view(-1), 6).indices.sort().values)


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (80, 48), (640, 2048)])
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_struct_is_rows_columns_and_diagonal_within_budget(shape, rank):
    rows, cols = shape
    k = budget(shape, rank=rank)
    idx = make_mask(torch.zeros(shape), "struct", rank=rank)
    f = struct_stride(rows, cols, k)
    assert idx.numel() <= k
    denser = f - 1 if f > 1 else (max(rows, cols) if f == 0 else None)
    if denser:  # the next denser pattern would not have fit
        assert struct_mask(rows, cols, denser).numel() > k
    keep = torch.zeros(rows * cols, dtype=torch.bool)
    keep[idx] = True
    keep = keep.view(rows, cols)
    d = torch.arange(min(rows, cols))
    assert keep[d, d].all()
    if f == 0:
        assert idx.numel() == min(rows, cols)
        return
    assert keep[::f, :].all() and keep[:, ::f].all()
    assert idx.numel() == keep[::f, :].numel() + keep[:, ::f].numel() - keep[::f, ::f].numel() + (min(rows, cols) - len(range(0, min(rows, cols), f)))


@pytest.mark.parametrize("shape", [(64, 64), (48, 80), (80, 48), (640, 2048), (37, 53)])
def test_struct_grid_moves_with_the_seed_within_budget(shape):
    """A seeded struct mask is the same rows/columns/diagonal pattern, its grid shifted: exact
    count, within budget, whole rows and columns, and two seeds share few entries."""
    rows, cols = shape
    k = budget(shape, rank=4)
    masks = []
    for seed in (1, 2, 3):
        shift = struct_shift(seed)
        f = struct_stride(rows, cols, k, shift)
        idx = make_mask(torch.zeros(shape), "struct", rank=4, seed=seed)
        assert torch.equal(idx, struct_mask(rows, cols, f, shift)) and idx.numel() <= k
        keep = torch.zeros(rows * cols, dtype=torch.bool)
        keep[idx] = True
        keep = keep.view(rows, cols)
        r0, c0 = int(shift[0] * f), int(shift[1] * f)
        assert keep[r0::f, :].all() and keep[:, c0::f].all() and keep[torch.arange(min(shape)), torch.arange(min(shape))].all()
        masks.append(idx)
    assert struct_shift(0) == (0.0, 0.0) and struct_shift(1) == struct_shift(1) != struct_shift(2)
    overlap = torch.isin(masks[0], masks[1]).float().mean()
    assert overlap < 0.6, overlap  # the unshifted grids of two seeds overlap 100 %
    per_key = make_masks({"unet.a": torch.zeros(shape), "unet.b": torch.zeros(shape)}, "struct", rank=4, seed=5)
    assert not torch.equal(per_key["unet.a"], per_key["unet.b"])  # each weight its own shift


def test_struct_is_high_rank():
    rows, cols = 96, 64
    idx = make_mask(torch.zeros(rows, cols), "struct", rank=2)
    f = struct_stride(rows, cols, budget((rows, cols), rank=2))
    dense = torch.zeros(rows * cols, dtype=torch.float64)
    dense[idx] = torch.randn(idx.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rank = int(torch.linalg.matrix_rank(dense.view(rows, cols)))
    assert rank > rows / f
    assert rank == min(rows, cols)


def test_struct_budget_too_small_is_a_clear_error():
    assert struct_stride(64, 64, 190) == 64 and struct_stride(64, 64, 189) == 0
    with pytest.raises(ValueError, match="struct mask on a 64x64 weight needs at least 64 entries; budget is 4"):
        make_mask(torch.zeros(64, 64), "struct", density=0.001)
