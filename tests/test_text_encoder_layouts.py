"""Adapter keys are canonical (``text_encoder.text_model.encoder...``, the layout of diffusers' LoRA
files) and apply to a text encoder laid out either way: transformers 5 dropped ``text_model``
inside ``CLIPTextModel``, 4.x has it."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shira_diffusion import ShiraEngine, SparseAdapter, find_targets, fingerprint
from shira_diffusion.adapter import canonical_key
from shira_diffusion.demo.model import ADAPTERS_DIR
from shira_diffusion.testing import random_adapter, tiny_sdxl_pipeline


class WithTextModel(torch.nn.Module):
    """transformers 4.x's CLIPTextModel: the same modules one level down, under ``text_model``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.text_model = inner


def both_layouts():
    """The same text encoder (same weights) in each layout; whichever the installed transformers builds is one of them."""
    flat = tiny_sdxl_pipeline(seed=0).text_encoder
    if hasattr(flat, "text_model"):  # transformers 4.x installed: build the 5.x layout from its inner module
        flat = flat.text_model
    nested = WithTextModel(tiny_sdxl_pipeline(seed=0).text_encoder)
    nested = nested if not hasattr(nested.text_model, "text_model") else nested.text_model
    return flat, nested


def weights_of(module) -> dict[str, torch.Tensor]:
    return {k.removeprefix("text_model."): v.clone() for k, v in module.state_dict().items()}


def test_canonical_key():
    assert canonical_key("text_encoder.encoder.layers.0.self_attn.q_proj") == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert canonical_key("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert canonical_key("text_encoder_2.encoder.layers.1.mlp.fc1") == "text_encoder_2.text_model.encoder.layers.1.mlp.fc1"
    assert canonical_key("unet.down_blocks.1.attentions.0.proj_in") == "unet.down_blocks.1.attentions.0.proj_in"


def test_both_layouts_give_the_same_keys_and_fingerprint_and_take_the_same_adapter():
    flat, nested = both_layouts()
    assert any(n.startswith("encoder.") for n, _ in flat.named_modules())
    assert any(n.startswith("text_model.encoder.") for n, _ in nested.named_modules())
    keys = {}
    for te in (flat, nested):
        targets = find_targets({"text_encoder": te}, ["text_encoder"])
        keys[id(te)] = targets
        assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in targets) and len(targets) == 20
    a, b = keys.values()
    assert list(a) == list(b)
    assert fingerprint({k: w.shape for k, w in a.items()}) == fingerprint({k: w.shape for k, w in b.items()})
    adapter = random_adapter(a, "rand", density=0.1, seed=3, std=0.5)
    applied = []
    for te in (flat, nested):
        engine = ShiraEngine({"text_encoder": te})
        base = weights_of(te)
        engine.stage("a", adapter)
        engine.apply("a")
        applied.append(weights_of(te))
        assert any(not torch.equal(applied[-1][k], base[k]) for k in base)
        engine.restore()
        assert all(torch.equal(v, base[k]) for k, v in weights_of(te).items())
    assert all(torch.equal(applied[0][k], applied[1][k]) for k in applied[0])  # the same entries changed the same way


def test_a_file_written_with_the_old_text_encoder_keys_still_loads(tmp_path):
    flat, nested = both_layouts()
    adapter = random_adapter(find_targets({"text_encoder": flat}, ["text_encoder"]), "rand", density=0.1, seed=4)
    path = adapter.save(tmp_path / "new.safetensors")
    # the same file as this project wrote it before keys were canonical: names as transformers 5 lays them out
    tensors = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in load_file(str(path)).items()}
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    shapes = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in json.loads(header["shapes"]).items()}
    header["shapes"] = json.dumps(shapes)
    header["fingerprint"] = json.dumps(fingerprint({k: tuple(v) for k, v in shapes.items()}))
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=header)
    old = SparseAdapter.load(tmp_path / "old.safetensors")
    assert list(old.deltas) == list(adapter.deltas)
    assert old.metadata["fingerprint"] == SparseAdapter.load(path).metadata["fingerprint"]
    for te in (flat, nested):
        engine = ShiraEngine({"text_encoder": te})
        engine.stage("old", old)
        engine.apply("old")
        engine.restore()


def test_the_same_weight_under_both_names_is_refused():
    flat, _ = both_layouts()
    adapter = random_adapter(find_targets({"text_encoder": flat}, ["text_encoder"]), "rand", density=0.1, seed=5)
    key = next(iter(adapter.deltas))
    with pytest.raises(ValueError, match="under the other text-encoder layout"):
        SparseAdapter({key: adapter.deltas[key], key.replace("text_model.", ""): adapter.deltas[key]})


def test_peft_export_names_modules_as_the_installed_transformers_lays_them_out(tmp_path):
    pipe = tiny_sdxl_pipeline(seed=0)
    adapter = random_adapter(find_targets(pipe, ["text_encoder"]), "rand", density=0.1, seed=6)
    folder = adapter.to_peft(tmp_path / "peft", component="text_encoder")
    names = {n for n, _ in pipe.text_encoder.named_modules()}
    stored = {k.removeprefix("base_model.model.").removesuffix(".shira_weight") for k in load_file(str(folder / "adapter_model.safetensors"))
              if k.endswith(".shira_weight")}
    assert stored and stored <= names
    back = SparseAdapter.from_peft(folder, component="text_encoder", model=pipe.text_encoder)
    assert list(back.deltas) == list(adapter.deltas)


@pytest.mark.parametrize("path", sorted(ADAPTERS_DIR.glob("*shira*.safetensors")), ids=lambda p: p.stem)
def test_shipped_adapters_store_canonical_keys(path):
    with safe_open(str(path), framework="pt") as f:
        keys = {k.rsplit(".", 1)[0] for k in f.keys()}
    assert {k for k in keys if k.startswith("text_encoder.")} and all(
        k.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model.")) for k in keys)
