import json

import pytest
import torch
from peft import LoraConfig, PeftModel, ShiraConfig, get_peft_model, inject_adapter_in_model
from safetensors.torch import save_file

from conftest import snapshot
from shira_diffusion import AdapterError, LoraAdapter, ShiraEngine, SparseAdapter, find_targets
from shira_diffusion.interop import lora_to_shira, read_lora
from shira_diffusion.testing import kohya_lora_file, random_adapter, tiny_sdxl_pipeline, tiny_sdxl_unet

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def peft_shira_save(tmp_path, seed=0):
    torch.manual_seed(seed)
    unet = tiny_sdxl_unet(seed=0)
    model = get_peft_model(unet, ShiraConfig(r=2, target_modules=UNET_TARGETS, init_weights=False))
    model.save_pretrained(str(tmp_path / "peft"))
    merged = model.merge_and_unload()
    return tmp_path / "peft", {k: v.clone() for k, v in merged.state_dict().items()}


def test_peft_shira_import_applies_like_merge_and_unload(tmp_path):
    folder, merged = peft_shira_save(tmp_path)
    unet = tiny_sdxl_unet(seed=0)
    adapter = SparseAdapter.from_peft(folder, component="unet", model=unet)
    assert len(adapter.deltas) == 96
    assert all(d.nnz == 2 * sum(d.shape) for d in adapter.deltas.values())
    engine = ShiraEngine({"unet": unet})
    engine.stage("p", adapter)
    engine.apply("p")
    for name, value in unet.state_dict().items():
        torch.testing.assert_close(value, merged[name], rtol=0, atol=1e-6)


def test_peft_shira_import_infers_shapes_without_a_model(tmp_path):
    folder, _ = peft_shira_save(tmp_path)
    with_model = SparseAdapter.from_peft(folder, model=tiny_sdxl_unet(seed=0))
    try:
        alone = SparseAdapter.from_peft(folder)
    except AdapterError as err:  # random masks may leave the last row/column empty
        assert "pass the model" in str(err)
        return
    for key, d in with_model.deltas.items():
        assert alone.deltas[key].shape == d.shape and torch.equal(alone.deltas[key].indices, d.indices)


def test_our_export_loads_in_peft_and_merges_to_our_weights(tmp_path):
    unet = tiny_sdxl_unet(seed=0)
    adapter = random_adapter(find_targets({"unet": unet}), "wm", density=0.05, seed=4, std=0.2)
    engine = ShiraEngine({"unet": unet})
    engine.stage("a", adapter)
    engine.apply("a")
    ours = snapshot(unet)
    folder = adapter.to_peft(tmp_path / "export")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["r"] >= 1
    merged = PeftModel.from_pretrained(tiny_sdxl_unet(seed=0), str(folder)).merge_and_unload()
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, ours[name], rtol=0, atol=1e-6)
    # and it reads back to the same deltas (padding entries are zero)
    back = SparseAdapter.from_peft(folder, model=tiny_sdxl_unet(seed=0))
    for key, d in adapter.deltas.items():
        dense = back.deltas[key].to_dense()
        assert torch.equal(dense, d.to_dense())


def test_peft_folder_errors(tmp_path):
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        SparseAdapter.from_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(AdapterError, match="expected 'SHIRA'"):
        SparseAdapter.from_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "SHIRA", "r": 1}')
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="pickled adapter_model.bin files are not read"):
        SparseAdapter.from_peft(tmp_path)


# ---- LoRA files --------------------------------------------------------------------------------------


def fused_by_diffusers(path):
    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


def assert_engine_matches(path, tol=1e-6):
    pipe = tiny_sdxl_pipeline(seed=0)
    base = {c: snapshot(getattr(pipe, c)) for c in ("unet", "text_encoder", "text_encoder_2")}
    lora = read_lora(path, pipe)
    assert isinstance(lora, LoraAdapter)
    # reading left no PEFT layers behind and wrote nothing
    assert not any("lora" in n for n, _ in pipe.unet.named_modules())
    for c, state in base.items():
        assert all(torch.equal(v, state[k]) for k, v in getattr(pipe, c).state_dict().items())
    engine = ShiraEngine(pipe)
    engine.stage("l", lora)
    engine.apply("l")
    reference = fused_by_diffusers(path)
    for c in ("unet", "text_encoder", "text_encoder_2"):
        want = getattr(reference, c).state_dict()
        for k, v in getattr(pipe, c).state_dict().items():
            torch.testing.assert_close(v, want[k], rtol=0, atol=tol, msg=f"{c}.{k}")
    engine.restore()
    for c, state in base.items():
        assert all(torch.equal(v, state[k]) for k, v in getattr(pipe, c).state_dict().items()), c
    return lora


def test_diffusers_lora_file_applies_like_fuse_lora(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["q_proj", "v_proj"]), pipe.text_encoder)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
    )
    lora = assert_engine_matches(tmp_path / "pytorch_lora_weights.safetensors")
    assert set(lora.components) == {"unet", "text_encoder"}
    assert len([k for k in lora.deltas if k.startswith("unet.")]) == 96


def test_kohya_lora_file_applies_like_fuse_lora(tmp_path):
    kohya_lora_file(tmp_path / "kohya.safetensors", seed=1)
    lora = assert_engine_matches(tmp_path / "kohya.safetensors")
    assert set(lora.components) == {"unet", "text_encoder", "text_encoder_2"}
    assert {d.scale for d in lora.deltas.values()} == {0.5}  # alpha / rank


def test_lora_and_shira_fuse_together_and_restore_exactly(tmp_path):
    tensors = {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(2, 64),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(64, 2),
    }
    save_file(tensors, str(tmp_path / "k.safetensors"))
    pipe = tiny_sdxl_pipeline(seed=0)
    base = snapshot(pipe.unet)
    engine = ShiraEngine(pipe)
    shira = random_adapter(find_targets(pipe), density=0.1, seed=2, std=0.3)
    engine.stage("s", shira)
    engine.apply("s")
    engine.stage("l", read_lora(tmp_path / "k.safetensors", pipe))  # staged while SHiRA is applied
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = engine.store.get("l").adapter.deltas[key]
    engine.apply({"s": 0.5, "l": 2.0})
    w = pipe.unet.get_submodule(key.removeprefix("unet.")).weight.view(-1)
    want = base[key.removeprefix("unet.") + ".weight"].view(-1).clone()
    total = lora.dense() * 2.0
    total.index_add_(0, shira.deltas[key].indices.long(), shira.deltas[key].values * 0.5)
    assert torch.equal(w, (want + total).to(w.dtype))  # lora then shira (name order), fp32, cast once
    engine.apply("l")
    engine.restore()
    assert all(torch.equal(v, base[k]) for k, v in pipe.unet.state_dict().items())


def test_bad_lora_file_is_a_clear_error(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    pipe = tiny_sdxl_pipeline(seed=0)
    with pytest.raises(AdapterError, match="not a LoRA file diffusers can load"):
        read_lora(tmp_path / "x.safetensors", pipe)
    with pytest.raises(AdapterError, match="must be .safetensors"):
        read_lora(tmp_path / "x.ckpt", pipe)


def test_lora_to_shira_keeps_exactly_the_top_k(tmp_path):
    g = torch.Generator().manual_seed(3)
    from shira_diffusion import LoraDelta

    lora = LoraAdapter({"unet.a.to_q": LoraDelta(torch.randn(3, 40, generator=g), torch.randn(30, 3, generator=g), 0.5, (30, 40))})
    shira, energy = lora_to_shira(lora, density=0.1)
    d = shira.deltas["unet.a.to_q"]
    dense = lora.deltas["unet.a.to_q"].dense()
    assert d.nnz == 120
    assert torch.equal(d.indices.long(), torch.topk(dense.abs(), 120).indices.sort().values)
    assert torch.equal(d.values, dense[d.indices.long()])
    kept = dense[d.indices.long()].norm() / dense.norm()
    assert energy["unet"] == pytest.approx(float(kept), rel=1e-6)
    assert 0.1 < energy["unet"] < 1.0


def test_diffusers_dora_file_applies_like_fuse_lora(tmp_path):
    """A PEFT DoRA LoRA saved by diffusers: read with its magnitude vectors, applied as DoRA (as
    diffusers' own fuse_lora applies it), never as plain LoRA."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", use_dora=True, target_modules=UNET_TARGETS))
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
        if "lora_magnitude_vector" in n:
            p.data.mul_(torch.rand_like(p) + 0.5)
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    lora = assert_engine_matches(tmp_path / "pytorch_lora_weights.safetensors", tol=1e-5)
    assert lora.kinds == {"dora": 96}


def test_lora_with_bias_deltas_applies_like_fuse_lora(tmp_path):
    """PEFT's ``lora_bias``: the up projection's bias is a delta of the module's bias."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, lora_bias=True, target_modules=["to_out.0", "proj_in"]))
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:  # weight and bias
            p.data.normal_(0, 0.1)
    StableDiffusionXLPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    lora = assert_engine_matches(tmp_path / "pytorch_lora_weights.safetensors")
    biases = [k for k in lora.deltas if k.endswith(":bias")]
    assert len(biases) == len(lora.deltas) // 2 and lora.kinds == {"full": len(biases), "lora": len(biases)}
