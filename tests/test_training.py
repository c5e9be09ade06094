import pytest
import torch
from torch import nn

from conftest import assert_same_state, snapshot
from shira_diffusion import ShiraEngine, find_targets, make_masks
from shira_diffusion.training import SparseTraining


def linear_setup(seed=0, dtype=torch.float32, bias=True):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10, bias=bias), nn.GELU(), nn.Linear(10, 6, bias=bias)).to(dtype)
    model.requires_grad_(False)
    components = {"unet": model}
    masks = make_masks({"unet.0": model[0].weight, "unet.2": model[2].weight}, "rand", density=0.3, seed=seed)
    return model, components, masks


def test_values_gradient_equals_dense_gradient_at_the_mask():
    model, components, masks = linear_setup()
    x = torch.randn(4, 5, 12)
    target = torch.randn(4, 5, 6)

    # dense reference: the same model with trainable dense weights
    ref = nn.Sequential(nn.Linear(12, 10), nn.GELU(), nn.Linear(10, 6))
    ref.load_state_dict(model.state_dict())
    ((ref(x) - target) ** 2).mean().backward()

    training = SparseTraining(components, masks)
    ((model(x) - target) ** 2).mean().backward()
    for key, layer in (("unet.0", 0), ("unet.2", 2)):
        got = model[layer].shira_values.grad
        want = ref[layer].weight.grad.view(-1)[masks[key]]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert {id(p) for p in training.parameters()} == {id(p) for p in model.parameters() if p.requires_grad}


def test_forward_uses_the_live_weight_without_copies():
    model, components, masks = linear_setup()
    weight_ptr = model[0].weight.data_ptr()
    training = SparseTraining(components, masks)
    with torch.no_grad():
        model[0].shira_values += 1.0
    y = model(torch.randn(2, 12))
    assert model[0].weight.data_ptr() == weight_ptr
    assert torch.equal(model[0].weight.view(-1)[masks["unet.0"]], model[0].shira_base + 1.0)
    assert y.shape == (2, 6)
    assert training.num_params == masks["unet.0"].numel() + masks["unet.2"].numel()


def test_overfitting_one_batch_drives_loss_down():
    model, components, masks = linear_setup(seed=1)
    x = torch.randn(16, 12)
    with torch.no_grad():  # a reachable target: the same model with its masked entries moved
        teacher = [layer.weight.clone() for layer in (model[0], model[2])]
        for layer, key in ((model[0], "unet.0"), (model[2], "unet.2")):
            layer.weight.view(-1)[masks[key]] += 0.5 * torch.randn(masks[key].numel())
        target = model(x)
        for layer, w in zip((model[0], model[2]), teacher):
            layer.weight.copy_(w)
    training = SparseTraining(components, masks)
    opt = torch.optim.Adam(training.parameters(), lr=2e-2)
    losses = []
    for _ in range(200):
        loss = ((model(x) - target) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.02 * losses[0]


def test_export_is_trained_minus_original_and_remove_restores_base():
    model, components, masks = linear_setup()
    base = snapshot(model)
    training = SparseTraining(components, masks)
    with torch.no_grad():
        model[2].shira_values[:3] += torch.tensor([0.5, -0.25, 1.0])
    adapter = training.export({"mask": "rand"})
    d = adapter.deltas["unet.2"]
    assert torch.equal(d.indices.long(), masks["unet.2"])
    trained = model[2].shira_values.detach()[:3]
    assert torch.equal(d.values[:3], trained - model[2].shira_base[:3])
    torch.testing.assert_close(d.values[:3], torch.tensor([0.5, -0.25, 1.0]))
    assert torch.count_nonzero(d.values[3:]) == 0 and torch.count_nonzero(adapter.deltas["unet.0"].values) == 0
    training.remove()
    assert_same_state(model, base)
    assert not hasattr(model[2], "shira_values") and "forward" not in vars(model[2])
    # the exported adapter applied by the engine reproduces the trained weights
    engine = ShiraEngine(components)
    engine.stage("t", adapter)
    engine.apply("t")
    live = model[2].weight.view(-1)[masks["unet.2"]]
    assert torch.equal(live, base["2.weight"].view(-1)[masks["unet.2"]] + d.values)
    torch.testing.assert_close(live[:3], trained)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_activations_in_model_dtype_and_values_fp32(dtype):
    model, components, masks = linear_setup()
    training = SparseTraining(components, masks)
    x = torch.randn(8, 12)
    with torch.autocast("cpu", dtype=dtype):
        y = model(x)
        assert y.dtype == dtype
    y.float().pow(2).mean().backward()
    saved = []

    def pack(t):
        saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=dtype):
        model[0](x)
    # only the input activation is kept, in the autocast dtype (no fp32 copy); the mask stays compact
    assert saved == [dtype]
    for p in training.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32


def test_half_precision_model_trains_with_fp32_values():
    model, components, masks = linear_setup(dtype=torch.bfloat16)
    training = SparseTraining(components, masks)
    opt = torch.optim.SGD(training.parameters(), lr=0.1)
    before = model[0].weight.clone()
    model(torch.randn(4, 12, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    training.sync_weights()
    changed = (model[0].weight != before).view(-1)
    assert changed.any() and not changed[~torch.isin(torch.arange(changed.numel()), masks["unet.0"])].any()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_unet):
    from shira_diffusion.testing import tiny_sdxl_unet

    def grads(checkpointing: bool):
        unet = tiny_sdxl_unet(seed=0)
        masks = make_masks(find_targets({"unet": unet}), "rand", density=0.05, seed=3)
        training = SparseTraining({"unet": unet}, masks)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        g = torch.Generator().manual_seed(0)
        out = unet(
            torch.randn(2, 4, 16, 16, generator=g),
            torch.tensor([10, 500]),
            encoder_hidden_states=torch.randn(2, 7, 64, generator=g),
            added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)},
        ).sample
        out.pow(2).mean().backward()
        return [p.grad.clone() for p in training.parameters()]

    plain, ckpt = grads(False), grads(True)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert any(bool(g.abs().sum() > 0) for g in plain)


def test_rejects_targets_that_are_neither_linear_nor_conv2d(tiny_unet):
    with pytest.raises(TypeError, match="supports nn.Linear and nn.Conv2d, got GroupNorm"):
        SparseTraining({"unet": tiny_unet}, {"unet.conv_norm_out": torch.tensor([0, 1])})


def test_sparse_unet_overfits_one_batch():
    from shira_diffusion.testing import tiny_sdxl_unet

    unet = tiny_sdxl_unet(seed=0)
    weights = find_targets({"unet": unet})
    masks = make_masks(weights, "wm", density=0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 7, 64, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}}
    with torch.no_grad():  # a reachable target: the UNet with its masked entries moved
        saved = {k: w.clone() for k, w in weights.items()}
        for k, w in weights.items():
            w.view(-1)[masks[k]] += 0.2 * torch.randn(masks[k].numel(), generator=g)
        target = unet(x, torch.tensor([100, 700]), **cond).sample
        for k, w in weights.items():
            w.copy_(saved[k])
    training = SparseTraining({"unet": unet}, masks)
    opt = torch.optim.AdamW(training.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = (unet(x, torch.tensor([100, 700]), **cond).sample - target).pow(2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.2 * losses[0], losses[::10]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_struct_masks_get_their_gradient_from_slices_not_a_dense_weight_gradient(dtype):
    """Rows + columns + diagonal: the values' gradient comes from g[:, R]^T x, g^T x[:, C] and a
    row-wise product, equal to the dense gradient at the mask; no (out, in) matmul is formed."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80, bias=False)).to(dtype).requires_grad_(False)
    ref = nn.Linear(96, 80, bias=False).to(dtype)
    ref.load_state_dict(model[0].state_dict())
    masks = make_masks({"unet.0": model[0].weight}, "struct", density=0.05)
    training = SparseTraining({"unet": model}, masks)
    slices = model[0].shira_slices
    assert slices is not None and slices.rows.numel() and slices.cols.numel() and slices.diag.numel()
    x, target = torch.randn(3, 7, 96, dtype=dtype), torch.randn(3, 7, 80, dtype=dtype)
    with FlopCounterMode(display=False) as sparse_flops:
        ((model(x) - target) ** 2).mean().backward()
    ((ref(x) - target) ** 2).mean().backward()
    want = ref.weight.grad.view(-1)[masks["unet.0"]].to(torch.float32)
    got = training.parameters()[0].grad
    tolerance = (1e-6 if dtype == torch.float64 else 2e-2) * float(want.abs().max())  # the values (and their grads) are fp32
    assert float((got - want).abs().max()) <= tolerance
    dense_weight_grad = 2 * 21 * 80 * 96
    forward_and_input_grad = 2 * (2 * 21 * 80 * 96)
    assert sparse_flops.get_total_flops() - forward_and_input_grad < dense_weight_grad / 4


def test_unstructured_masks_keep_the_dense_path():
    model, components, masks = linear_setup()
    SparseTraining(components, masks)
    assert model[0].shira_slices is None and model[2].shira_slices is None


def test_conv2d_weights_train_sparsely_with_the_dense_gradient_at_the_mask():
    torch.manual_seed(0)
    layers = lambda: nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.SiLU(), nn.Conv2d(6, 5, 3, stride=2, padding=1)).double()  # noqa: E731
    model, ref = layers().requires_grad_(False), layers()
    ref.load_state_dict(model.state_dict())
    masks = make_masks({"unet.0": model[0].weight, "unet.2": model[2].weight}, "rand", density=0.3, seed=0)
    training = SparseTraining({"unet": model}, masks)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    (model(x) ** 2).mean().backward()
    (ref(x_ref) ** 2).mean().backward()
    assert torch.allclose(x.grad, x_ref.grad)
    for value, (key, i) in zip(training.parameters(), [("unet.0", 0), ("unet.2", 2)]):
        assert torch.equal(value.grad, ref[i].weight.grad.view(-1)[masks[key]].float())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training.remove()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the base was never moved
    with pytest.raises(TypeError, match="zero-padded convolutions"):
        SparseTraining({"unet": nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))}, {"unet.0": torch.tensor([0])})


def test_target_specs_name_layer_groups_wildcards_and_regexes():
    from shira_diffusion.adapter import AdapterError
    from shira_diffusion.targets import parse_targets
    from shira_diffusion.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    specs = parse_targets(["unet:attn,ff", "unet:*.proj_in", "unet:conv", "text_encoder:*"])
    assert specs["unet"][:6] == ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    found = find_targets(pipe, specs)
    kinds = {type(pipe.unet.get_submodule(k.removeprefix("unet."))).__name__ for k in found if k.startswith("unet.")}
    assert kinds == {"Linear", "Conv2d"} and any(k.endswith("resnets.0.conv1") for k in found)
    assert sum(k.endswith(".proj_in") for k in found) == 6 and sum(k.endswith(".ff.net.2") for k in found) == 12  # 6 attentions, 12 blocks
    te = [k for k in found if k.startswith("text_encoder.")]
    assert len(te) == 30 and all(".layer_norm" not in k and "embeddings" not in k for k in te)  # a wildcard takes Linear layers only
    assert parse_targets(["unet"]) == {"unet": ("to_q", "to_k", "to_v", "to_out.0")}
    with pytest.raises(AdapterError, match="unknown component 'vae'"):
        parse_targets(["vae:*"])
    with pytest.raises(AdapterError, match="an empty pattern"):
        parse_targets(["unet:attn,"])


def test_masks_are_held_compactly_and_base_values_can_wait_on_disk():
    """2 bytes per mask entry (int16 columns, int32 row counts) instead of int32 or int64 flat
    indices; with ``base_on_disk`` no base values in memory; export, resume and restore are the same
    bits either way."""
    from shira_diffusion.training import _Mask, mask_bytes

    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(40 * 300, generator=g)[:900].sort().values
    mask = _Mask(idx, (40, 300), torch.device("cpu"))
    assert mask.col.dtype == torch.int16 and mask.counts.dtype == torch.int32 and mask.flat_indices is None
    assert torch.equal(mask.flat(), idx) and mask.nbytes == 900 * 2 + 40 * 4
    wide = _Mask(torch.tensor([0, 5, 2**15 + 3]), (2, 2**15 + 10), torch.device("cpu"))
    assert wide.flat_indices.dtype == torch.int32 and torch.equal(wide.flat(), torch.tensor([0, 5, 2**15 + 3]))

    results = {}
    for on_disk in (False, True):
        model, components, masks = linear_setup()
        before = model[0].weight.detach().clone()
        training = SparseTraining(components, masks, base_on_disk=on_disk)
        assert hasattr(model[0], "shira_base") is not on_disk
        held = mask_bytes(model[0])
        with torch.no_grad():
            training.parameters()[0].add_(0.25)
        adapter = training.export()
        training.load_values(adapter)
        folder = training._base_file.parent if on_disk else None
        training.remove()
        assert torch.equal(model[0].weight, before)  # the base back, bit for bit
        assert folder is None or not folder.exists()
        results[on_disk] = (adapter, held)
    (a, held_mem), (b, held_disk) = results[False], results[True]
    assert all(torch.equal(a.deltas[k].values, b.deltas[k].values) and torch.equal(a.deltas[k].indices, b.deltas[k].indices)
               for k in a.deltas)
    assert held_mem - held_disk == a.deltas["unet.0"].nnz * 4  # fp32 weights here: 4 bytes of base value per entry
