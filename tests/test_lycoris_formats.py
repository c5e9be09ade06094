"""kohya / LyCORIS files of every kind: each delta against an independent reference (the
``lycoris-lora`` package's own functions, PEFT's layers), switched, fused and restored bit-exactly."""

import json

import pytest
import torch
from lycoris.functional import locon, loha, lokr
from lycoris.functional.general import weight_decompose
from safetensors.torch import save_file

from shira_diffusion import AdapterError, LoraAdapter, ShiraPipelineSwitcher
from shira_diffusion.adapter import BIAS
from shira_diffusion.kohya import kohya_names, read_kohya, training_metadata
from shira_diffusion.lora import LohaDelta, LokrDelta, LoraDelta
from shira_diffusion.targets import pipeline_components, resolve_weight
from shira_diffusion.testing import SDXL_UNET_CONFIG, random_adapter, tiny_sdxl_pipeline

ATTN = "transformer_blocks_0_attn1_to_q"


def _r(*shape, seed, std=0.1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


def mixed_file():
    """A file in the layouts real tools write: kohya's original SDXL block names and diffusers'
    names, both text encoders, every kind. ``(tensors, {key: (reference delta fn, bias delta)})``:
    each reference is the ``lycoris-lora`` package's own function of the same tensors."""
    t, ref = {}, {}

    def add(name, key, parts, reference):
        t.update({f"{name}.{p}": v for p, v in parts.items()})
        ref[key] = reference

    torch_only = {"backend": "torch"}
    # LoRA on a Linear, original SDXL block name (input_blocks.4.1 = down_blocks.1.attentions.0)
    down, up = _r(4, 64, seed=1), _r(64, 4, seed=2)
    add(f"lora_unet_input_blocks_4_1_{ATTN}", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(2.0)},
        lambda w: locon.diff_weight(down, up, None, gamma=2.0 / 4, **torch_only))
    # LoCon on a 3x3 conv, diffusers names, with DoRA on the output axis
    cd, cu, cm = _r(4, 32, 3, 3, seed=3), _r(32, 4, 1, 1, seed=4), (torch.rand(32, 1, 1, 1, generator=torch.Generator().manual_seed(5)) + 0.5)
    add("lora_unet_down_blocks_0_resnets_0_conv1", "unet.down_blocks.0.resnets.0.conv1",
        {"lora_down.weight": cd, "lora_up.weight": cu, "alpha": torch.tensor(8.0), "dora_scale": cm},
        lambda w: weight_decompose(w + locon.diff_weight(cd, cu, None, gamma=2.0, **torch_only), cm, 1, True, **torch_only) - w)
    # LoCon with a Tucker core (lora_mid), original names: input_blocks.2.0.out_layers.3 = down_blocks.0.resnets.1.conv2
    td, tm, tu = _r(4, 32, 1, 1, seed=6), _r(4, 4, 3, 3, seed=7), _r(32, 4, 1, 1, seed=8)
    add("lora_unet_input_blocks_2_0_out_layers_3", "unet.down_blocks.0.resnets.1.conv2",
        {"lora_down.weight": td, "lora_mid.weight": tm, "lora_up.weight": tu, "alpha": torch.tensor(4.0)},
        lambda w: locon.diff_weight(td, tu, tm, gamma=1.0, **torch_only))
    # LoHa on a Linear (feed-forward), with DoRA on the input axis
    h = [_r(512, 4, seed=9), _r(4, 64, seed=10), _r(512, 4, seed=11), _r(4, 64, seed=12)]
    hm = torch.rand(1, 64, generator=torch.Generator().manual_seed(13)) + 0.5
    add("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_ff_net_0_proj", "unet.down_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj",
        {"hada_w1_a": h[0], "hada_w1_b": h[1], "hada_w2_a": h[2], "hada_w2_b": h[3], "alpha": torch.tensor(2.0), "dora_scale": hm},
        lambda w: weight_decompose(w + loha.diff_weight(h[1], h[0], h[3], h[2], None, None, gamma=0.5, **torch_only), hm, 1, False, **torch_only) - w)
    # LoHa with Tucker cores on a conv (original name input_blocks.4.0.in_layers.2 = down_blocks.1.resnets.0.conv1)
    ht = [_r(3, 3, 3, 3, seed=14), _r(3, 64, seed=15), _r(3, 32, seed=16), _r(3, 3, 3, 3, seed=17), _r(3, 64, seed=18), _r(3, 32, seed=19)]
    add("lora_unet_input_blocks_4_0_in_layers_2", "unet.down_blocks.1.resnets.0.conv1",
        {"hada_t1": ht[0], "hada_w1_a": ht[1], "hada_w1_b": ht[2], "hada_t2": ht[3], "hada_w2_a": ht[4], "hada_w2_b": ht[5]},
        lambda w: loha.diff_weight(ht[2], ht[1], ht[5], ht[4], ht[0], ht[3], gamma=1.0, **torch_only))
    # LoKr on text encoder 1: full w1, low-rank w2
    k1, k2a, k2b = _r(4, 4, seed=20), _r(8, 2, seed=21), _r(2, 8, seed=22)
    add("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        {"lokr_w1": k1, "lokr_w2_a": k2a, "lokr_w2_b": k2b, "alpha": torch.tensor(1.0)},
        lambda w: lokr.diff_weight(k1, None, None, None, k2a, k2b, None, gamma=1.0, **torch_only))
    # LoKr on a conv with a Tucker w2 (original name input_blocks.3.0.op = down_blocks.0.downsamplers.0.conv)
    c1, ct, c2a, c2b = _r(2, 2, seed=23), _r(2, 2, 3, 3, seed=24), _r(2, 16, seed=25), _r(2, 16, seed=26)
    add("lora_unet_input_blocks_3_0_op", "unet.down_blocks.0.downsamplers.0.conv",
        {"lokr_w1": c1, "lokr_t2": ct, "lokr_w2_a": c2a, "lokr_w2_b": c2b, "alpha": torch.tensor(4.0)},
        # (lokr.diff_weight reads the rank off w2_a's second axis, which a Tucker w2_a does not have; the
        # LoKr module's own scale is alpha / rank, as here)
        lambda w: lokr.kron_weight(c1, None, None, None, c2a, c2b, ct, scale=4.0 / 2, **torch_only))
    # full diffs, weight and bias, on text encoder 2's MLP and on a UNet norm (1-D)
    fd, fb, nd, nb = _r(37, 32, seed=27), _r(37, seed=28), _r(64, seed=29), _r(64, seed=30)
    add("lora_te2_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2.text_model.encoder.layers.0.mlp.fc1",
        {"diff": fd, "diff_b": fb}, lambda w: fd)
    ref["text_encoder_2.text_model.encoder.layers.0.mlp.fc1" + BIAS] = lambda b: fb
    add("lora_unet_middle_block_1_norm", "unet.mid_block.attentions.0.norm", {"diff": nd, "diff_b": nb}, lambda w: nd)
    ref["unet.mid_block.attentions.0.norm" + BIAS] = lambda b: nb
    # DoRA LoRA on text encoder 2's projection, output axis
    pd, pu, pm = _r(2, 32, seed=31), _r(32, 2, seed=32), torch.rand(32, 1, generator=torch.Generator().manual_seed(33)) + 0.5
    add("lora_te2_text_projection", "text_encoder_2.text_projection",
        {"lora_down.weight": pd, "lora_up.weight": pu, "dora_scale": pm},
        lambda w: weight_decompose(w + locon.diff_weight(pd, pu, None, gamma=1.0, **torch_only), pm, 1, True, **torch_only) - w)
    return t, ref


HEADER = {
    "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "loha", "dora_wd": "True"}),
    "ss_network_dim": "8", "ss_network_alpha": "4", "ss_base_model_version": "sdxl_base_v1-0", "ss_resolution": "(1024, 1024)",
    "ss_num_train_images": "40", "ss_output_name": "bluefire_style",
    "ss_tag_frequency": json.dumps({"10_bluefire": {"bluefire style": 40, "flames": 39, "1girl": 12, "night": 3}}),
}


@pytest.fixture(scope="module")
def file(tmp_path_factory):
    tensors, _ = mixed_file()
    path = tmp_path_factory.mktemp("lyco") / "mixed.safetensors"
    save_file(tensors, str(path), metadata=HEADER)
    return path


def _state(pipe):
    return {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in pipeline_components(pipe).items()}


def test_every_kind_switches_like_its_reference_and_restores_bit_exactly(file):
    pipe = tiny_sdxl_pipeline(seed=0)
    sw = ShiraPipelineSwitcher(pipe)
    before = _state(pipe)
    components = pipeline_components(pipe)
    originals = {k: resolve_weight(components, k).detach().clone() for k in mixed_file()[1]}
    name = sw.load_adapter(file)
    adapter = sw.get_adapter(name)
    assert adapter.kinds == {"doha": 1, "dora": 2, "full": 4, "lokr": 2, "lora": 2, "loha": 1}
    refs = mixed_file()[1]
    assert set(adapter.deltas) == set(refs)
    for strength in (1.0, 0.6):
        sw.set_adapters(name, strength)
        for key, reference in refs.items():
            w = originals[key]
            want = w + strength * reference(w).reshape(w.shape)
            torch.testing.assert_close(resolve_weight(components, key).detach(), want, rtol=1e-5, atol=1e-6, msg=key)
    sw.set_adapters(None)
    after = _state(pipe)
    for c in before:
        assert all(torch.equal(v, after[c][k]) for k, v in before[c].items()), c


def test_a_lycoris_file_fuses_with_a_shira_adapter(file):
    pipe = tiny_sdxl_pipeline(seed=0)
    sw = ShiraPipelineSwitcher(pipe)
    components = pipeline_components(pipe)
    refs = mixed_file()[1]
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj"  # a DoRA LoHa
    shira = random_adapter({key: resolve_weight(components, key).detach()}, "rand", density=0.1, seed=3, std=0.2)
    w = resolve_weight(components, key).detach().clone()
    sw.load_adapter(file, "lyco")
    sw.load_adapter(shira, "shira")
    sw.set_adapters(["lyco", "shira"], [0.8, 0.5])
    d = shira.deltas[key]
    want = (w + 0.8 * refs[key](w)).view(-1)
    want[d.indices.long()] += 0.5 * d.values
    torch.testing.assert_close(resolve_weight(components, key).detach().view(-1), want, rtol=1e-5, atol=1e-6)
    sw.set_adapters(None)
    assert torch.equal(resolve_weight(components, key).detach(), w)


def test_fp16_weights_get_the_fp32_result_cast_once(file):
    pipe = tiny_sdxl_pipeline(seed=0).to(torch.float16)
    components = pipeline_components(pipe)
    refs = mixed_file()[1]
    originals = {k: resolve_weight(components, k).detach().clone() for k in refs}
    sw = ShiraPipelineSwitcher(pipe)
    name = sw.load_adapter(file)
    sw.set_adapters(name)
    adapter = sw.get_adapter(name)
    for key, reference in refs.items():
        w = originals[key].float()
        ours = adapter.deltas[key].dense(base=w).view(w.shape)
        torch.testing.assert_close(ours, reference(w).reshape(w.shape), rtol=1e-5, atol=1e-6, msg=key)
        assert torch.equal(resolve_weight(components, key).detach(), (w + ours).half()), key  # summed in fp32, cast once
    sw.set_adapters(None)
    assert all(torch.equal(resolve_weight(components, k).detach(), v) for k, v in originals.items())


def test_lokr_and_loha_match_peft_layers():
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    for config, kind in ((LoHaConfig(r=4, alpha=2, target_modules=["0"]), "loha"), (LoKrConfig(r=2, alpha=3, target_modules=["0"]), "lokr")):
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 24)), config)
        layer = model.base_model.model[0]
        with torch.no_grad():
            for name, param in layer.named_parameters():
                if "default" in name:
                    param.copy_(torch.randn_like(param))
        parts = {n.split(".")[0]: p.detach() for n, p in layer.named_parameters() if "default" in n}
        if kind == "loha":
            ours = LohaDelta(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"], 2 / 4, (24, 16))
        else:
            ours = LokrDelta(3 / 2, (24, 16), **{k.removeprefix("lokr_"): v for k, v in parts.items()})
        ours.validate(kind)
        torch.testing.assert_close(ours.dense().view(24, 16), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)


def test_dora_matches_peft_merge():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 24)), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(torch.rand(24) + 0.5)
    base = layer.get_base_layer().weight.detach().clone()
    ours = LoraDelta(layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), 2.0, (24, 16),
                     dora_scale=layer.lora_magnitude_vector["default"].weight.detach().clone())
    model.merge_adapter()
    torch.testing.assert_close(base + ours.dense(base=base).view(24, 16), layer.get_base_layer().weight.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(AdapterError, match="depends on the weight it is added to"):
        ours.dense()


def test_original_sdxl_block_names_map_to_diffusers_modules():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)
    names = kohya_names({"unet": unet})
    expect = {  # kohya's SDXL UNet (sdxl_original_unet) vs diffusers, as kohya's own converter pairs them
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2": "unet.down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
        "lora_unet_input_blocks_3_0_op": "unet.down_blocks.0.downsamplers.0.conv",
        "lora_unet_input_blocks_7_0_skip_connection": "unet.down_blocks.2.resnets.0.conv_shortcut",
        "lora_unet_input_blocks_1_0_emb_layers_1": "unet.down_blocks.0.resnets.0.time_emb_proj",
        "lora_unet_middle_block_1_proj_in": "unet.mid_block.attentions.0.proj_in",
        "lora_unet_middle_block_2_out_layers_3": "unet.mid_block.resnets.1.conv2",
        "lora_unet_output_blocks_2_2_conv": "unet.up_blocks.0.upsamplers.0.conv",
        "lora_unet_output_blocks_5_2_conv": "unet.up_blocks.1.upsamplers.0.conv",
        "lora_unet_output_blocks_8_0_in_layers_2": "unet.up_blocks.2.resnets.2.conv1",
        "lora_unet_label_emb_0_0": "unet.add_embedding.linear_1",
        "lora_unet_time_embed_2": "unet.time_embedding.linear_2",
        "lora_unet_input_blocks_0_0": "unet.conv_in",
        "lora_unet_out_2": "unet.conv_out",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    }
    assert {k: names.get(k) for k in expect} == expect
    assert len(set(names.values())) == sum(1 for _, m in unet.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.ia3_weight": torch.ones(64)}),
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.ia3_weight: not a key this reader understands"),
    (lambda t: t.update({"lora_unet_no_such_block_to_q.lora_down.weight": torch.ones(4, 64)}),
     "lora_unet_no_such_block_to_q.lora_down.weight: names no module of this pipeline"),
    (lambda t: t.pop("lora_te2_text_projection.lora_up.weight"), "lora_te2_text_projection.lora_up.weight: missing"),
    (lambda t: t.update({"lora_te2_text_projection.hada_w1_a": torch.ones(32, 2)}),
     "lora_te2_text_projection.lora_down.weight: a lora part next to loha parts in one module"),
    (lambda t: t.pop("lora_unet_input_blocks_3_0_op.lokr_w2_b"), "LoKr needs lokr_w2, or both lokr_w2_a and lokr_w2_b"),
    (lambda t: t.update({"lora_unet_down_blocks_0_resnets_0_conv1.dora_scale": torch.ones(1, 5, 1, 1)}), r"dora_scale \(1, 5, 1, 1\) is neither \(32, 1\) nor \(1, 32\)"),
    (lambda t: t.update({"lora_unet_input_blocks_2_0_out_layers_3.lora_up.weight": torch.ones(31, 4, 1, 1)}), "do not make|factors make a 31x"),
])
def test_unknown_or_partial_files_are_refused_whole(tmp_path, edit, message):
    tensors, _ = mixed_file()
    edit(tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    pipe = tiny_sdxl_pipeline(seed=0)
    sw = ShiraPipelineSwitcher(pipe)
    before = _state(pipe)
    with pytest.raises(AdapterError, match=message):
        sw.load_adapter(path)
    assert sw.list_adapters() == {}
    after = _state(pipe)
    assert all(torch.equal(v, after[c][k]) for c in before for k, v in before[c].items())


def test_training_metadata_and_trigger_prompt(file, capsys):
    meta = training_metadata(HEADER)
    assert meta == {"base_model": "sdxl_base_v1-0", "network": "LoHa + DoRA", "dim": "8", "alpha": "4", "output_name": "bluefire_style",
                    "images": "40", "resolution": "1024x1024",
                    "tags": {"bluefire style": 40, "flames": 39, "1girl": 12, "night": 3}, "trigger": "bluefire style, flames"}
    folder_only = training_metadata({"ss_tag_frequency": json.dumps({"10_sks dog": {}})})
    assert folder_only["trigger"] == "sks dog"
    assert training_metadata({"modelspec.trigger_phrase": "ohwx", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}) == {
        "base_model": "stable-diffusion-xl-v1-base/lora", "trigger": "ohwx"}
    assert training_metadata({}) == {}

    from shira_diffusion.cli import main

    assert main(["inspect", str(file)]) == 0  # no model: names, kinds and metadata from the header
    out = capsys.readouterr().out
    assert "kinds:       dora 3, full 2, locon 2, loha 2, lokr 2, lora 2 (modules)" in out
    assert "  network       LoHa + DoRA" in out
    assert "  trigger       'bluefire style, flames' (suggested prompt: \"bluefire style, flames, ...\")" in out

    sw = ShiraPipelineSwitcher(tiny_sdxl_pipeline(seed=0))
    name = sw.load_adapter(file, "fire")
    info = sw.list_adapters()[name]
    assert info["trigger"] == "bluefire style, flames" and info["base_model"] == "sdxl_base_v1-0"
    assert info["kind"] == "doha+dora+full+loha+lokr+lora"


def test_lora2shira_takes_every_kind(file, tmp_path, capsys):
    from shira_diffusion import SparseAdapter, budget
    from shira_diffusion.cli import main

    out = tmp_path / "shira.safetensors"
    assert main(["convert", "lora2shira", str(file), str(out), "--model", "tiny", "--density", "0.1"]) == 0
    printed = capsys.readouterr().out
    for component in ("text_encoder", "text_encoder_2", "unet"):
        assert f"  retained energy {component}: " in printed
    assert "not converted: 2 bias deltas" in printed
    shira = SparseAdapter.load(out)
    pipe = tiny_sdxl_pipeline(seed=0)
    components = pipeline_components(pipe)
    for key, reference in mixed_file()[1].items():
        if key.endswith(BIAS):
            assert key not in shira.deltas
            continue
        w = resolve_weight(components, key).detach()
        dense = reference(w).reshape(-1)
        d = shira.deltas[key]
        assert d.shape == tuple(w.shape)  # convolutions stay convolutions
        k = d.indices.numel()
        assert k == budget(tuple(w.shape), density=0.1)
        kept = dense.abs()[d.indices.long()]
        assert kept.min() >= dense.abs().topk(k).values.min() - 1e-6, key  # the largest entries
        torch.testing.assert_close(d.values.float(), dense[d.indices.long()], rtol=1e-5, atol=1e-6)


def test_read_kohya_needs_no_lock_and_no_weights():
    """The reader reads shapes only: it works on a pipeline whose weights are on the meta device."""
    from accelerate import init_empty_weights

    tensors, refs = mixed_file()
    with init_empty_weights():
        pipe = tiny_sdxl_pipeline(seed=0)
    adapter = read_kohya(tensors, pipeline_components(pipe))
    assert isinstance(adapter, LoraAdapter) and set(adapter.deltas) == set(refs)


def test_the_studio_library_shows_training_metadata(file):
    from shira_diffusion.app.studio import Studio

    studio = Studio(tiny_sdxl_pipeline(seed=0))
    studio.switcher.load_adapter(file, "fire")
    [row] = studio.library_rows()
    assert row[1] == "doha+dora+full+loha+lokr+lora" and row[3] == "rank 4"
    assert row[10] == "LoHa + DoRA dim 8/alpha 4; sdxl_base_v1-0; 1024x1024; trigger: bluefire style, flames"


def test_sd15_files_use_lora_te_and_diffusers_unet_names():
    """kohya trains SD 1.x on the diffusers UNet, and names its one text encoder ``lora_te_``."""
    from shira_diffusion.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    components = pipeline_components(pipe)
    tensors = {
        "lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_down.weight": _r(2, 32, seed=1),
        "lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight": _r(32, 2, seed=2),
        "lora_unet_mid_block_attentions_0_proj_out.hada_w1_a": _r(64, 2, seed=3),
        "lora_unet_mid_block_attentions_0_proj_out.hada_w1_b": _r(2, 64, seed=4),
        "lora_unet_mid_block_attentions_0_proj_out.hada_w2_a": _r(64, 2, seed=5),
        "lora_unet_mid_block_attentions_0_proj_out.hada_w2_b": _r(2, 64, seed=6),
    }
    adapter = read_kohya(tensors, components)
    assert sorted(adapter.deltas) == ["text_encoder.text_model.encoder.layers.0.self_attn.v_proj", "unet.mid_block.attentions.0.proj_out"]
    w = resolve_weight(components, "unet.mid_block.attentions.0.proj_out").detach()
    want = loha.diff_weight(tensors["lora_unet_mid_block_attentions_0_proj_out.hada_w1_b"], tensors["lora_unet_mid_block_attentions_0_proj_out.hada_w1_a"],
                            tensors["lora_unet_mid_block_attentions_0_proj_out.hada_w2_b"], tensors["lora_unet_mid_block_attentions_0_proj_out.hada_w2_a"],
                            None, None, gamma=1.0, backend="torch")
    torch.testing.assert_close(adapter.deltas["unet.mid_block.attentions.0.proj_out"].dense().view(w.shape), want.reshape(w.shape))
