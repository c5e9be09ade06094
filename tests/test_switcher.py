import threading

import pytest
import torch
from safetensors.torch import save_file

from conftest import snapshot
from shira_diffusion import AdapterError, ShiraPipelineSwitcher, SparseAdapter, SparseDelta, find_targets
from shira_diffusion.testing import random_adapter, tiny_sdxl_pipeline


def state(sw):
    return {c: snapshot(getattr(sw.pipe, c)) for c in ("unet", "text_encoder", "text_encoder_2")}


def same(a, b):
    return all(torch.equal(a[c][k], b[c][k]) for c in a for k in a[c])


@pytest.fixture
def sw(tmp_path):
    switcher = ShiraPipelineSwitcher(tiny_sdxl_pipeline(seed=0))
    weights = find_targets(switcher.pipe, ["unet", "text_encoder"])
    random_adapter(weights, "rand", density=0.08, seed=1, std=0.3).save(tmp_path / "bluefire.safetensors")
    random_adapter(weights, "wm", density=0.08, seed=2, std=0.3).save(tmp_path / "paintings.safetensors")
    switcher.load_adapter(tmp_path / "bluefire.safetensors")
    switcher.load_adapter(str(tmp_path / "paintings.safetensors"), adapter_name="paintings")
    return switcher


def render(sw, **kw):
    return sw("a fox", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images


def test_swap_fuse_disable_round_trips_are_bit_exact(sw):
    base = state(sw)
    sw.set_adapters("bluefire")
    assert sw.get_active_adapters() == ["bluefire"] and sw.last_switch_ms > 0
    one = state(sw)
    sw.set_adapters(["bluefire", "paintings"], adapter_weights=[1.0, 0.8])
    assert sorted(sw.get_active_adapters()) == ["bluefire", "paintings"]
    sw.set_adapters("bluefire")
    assert same(state(sw), one)
    sw.disable_adapters()
    assert same(state(sw), base) and sw.get_active_adapters() == []


def test_list_and_delete_adapters(sw):
    listed = sw.list_adapters()
    assert set(listed) == {"bluefire", "paintings"}
    info = listed["paintings"]
    assert info["kind"] == "shira" and info["mask"] == "wm" and info["dtype"] == "float32"
    assert info["components"] == ["text_encoder", "unet"] and info["bytes"] > 0 and info["active"] is False
    sw.set_adapters("paintings")
    assert sw.list_adapters()["paintings"]["active"] is True
    sw.delete_adapters("paintings")
    assert set(sw.list_adapters()) == {"bluefire"} and sw.get_active_adapters() == []
    with pytest.raises(KeyError):
        sw.delete_adapters("paintings")


def test_mismatched_or_corrupt_adapter_changes_nothing(sw, tmp_path):
    sw.set_adapters("bluefire")
    before = state(sw)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x80\x04 not safetensors")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        sw.load_adapter(tmp_path / "corrupt.safetensors")
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    wrong_shape = SparseAdapter({key: SparseDelta(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), (32, 64))})
    with pytest.raises(AdapterError, match="shape mismatch"):
        sw.load_adapter(wrong_shape, adapter_name="wrong")
    foreign = SparseAdapter({key: SparseDelta(torch.tensor([0]), torch.tensor([1.0]), (64, 64))}, {"fingerprint": "0123456789abcdef"})
    with pytest.raises(AdapterError, match="made for another model"):
        sw.load_adapter(foreign, adapter_name="foreign")
    with pytest.raises(ValueError, match="already loaded"):
        sw.load_adapter(tmp_path / "bluefire.safetensors")
    assert same(state(sw), before)
    assert set(sw.list_adapters()) == {"bluefire", "paintings"} and sw.get_active_adapters() == ["bluefire"]


def test_call_with_adapters_switches_and_generates_atomically(sw):
    base = render(sw, adapters=None)
    blue = render(sw, adapters="bluefire")
    fused = render(sw, adapters={"bluefire": 1.0, "paintings": 0.5})
    assert sw.engine.active == {"bluefire": 1.0, "paintings": 0.5}
    assert not torch.equal(base, blue) and not torch.equal(blue, fused)
    assert torch.equal(render(sw, adapters=None), base)
    assert torch.equal(render(sw, adapters=["bluefire"]), blue)


def test_thread_hammer_gives_each_request_its_own_adapters(sw):
    sets = [None, "bluefire", "paintings", {"bluefire": 1.0, "paintings": 0.8}]
    alone = [render(sw, adapters=s) for s in sets]
    results, errors = {}, []

    def worker(t):
        try:
            for r in range(20):
                i = (t + r) % len(sets)
                results[(t, r)] = (i, render(sw, adapters=sets[i]))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 80
    assert all(torch.equal(image, alone[i]) for i, image in results.values())


def test_compare_grid_size_labels_and_concept_loss(sw, tmp_path):
    grid, details = sw.compare("a fox", adapters=["bluefire", "paintings"], seeds=[0, 1], num_inference_steps=2, return_details=True)
    assert details["columns"] == ["base", "bluefire", "paintings", "bluefire+paintings"]
    assert grid.size == (60 + 4 * 192, 18 + 2 * 192)  # 64 px images shown at 192 px (nearest), one label line
    assert details["metric"] == "pixel" and details["metric_meaning"].startswith("pixel fallback")
    assert set(details["concept"]) == {"bluefire", "paintings"}
    from shira_diffusion.compare import concept_kept

    for name, figure in details["concept"].items():  # the mean over seeds of each image's figure
        per_seed = [concept_kept(s["base"], s[name], s["bluefire+paintings"], "pixel") for s in details["images"]]
        assert figure == {"fused": sum(per_seed) / 2}
    pair = details["weight_space"][("bluefire", "paintings")]
    assert 0.0 <= pair["overlap"] <= 1.0 and pair["weights_shared"] > 0
    assert sw.get_active_adapters() == ["bluefire", "paintings"]
    grid.save(tmp_path / "grid.png")


def test_compare_with_lora_counterparts(sw, tmp_path):
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(["lora_a", "lora_b"]):
        prefix = f"lora_unet_down_blocks_1_attentions_{i}_transformer_blocks_0_attn1_to_q"
        save_file({f"{prefix}.lora_down.weight": torch.randn(2, 64, generator=g) * 0.3,
                   f"{prefix}.lora_up.weight": torch.randn(64, 2, generator=g) * 0.3}, str(tmp_path / f"{name}.safetensors"))
        sw.load_adapter(tmp_path / f"{name}.safetensors")
    assert sw.list_adapters()["lora_a"]["kind"] == "lora" and sw.list_adapters()["lora_a"]["rank"] == 2
    grid, details = sw.compare("a fox", ["bluefire", "paintings"], seeds=[3], lora_pair=["lora_a", "lora_b"],
                               num_inference_steps=2, return_details=True)
    assert details["columns"][-3:] == ["lora_a", "lora_b", "LoRA lora_a+lora_b"]
    assert grid.size == (60 + 7 * 192, 18 + 192)
    assert set(details["lora_concept"]) == {"lora_a", "lora_b"}


def test_model_sources(tmp_path):
    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "folder")
    sw = ShiraPipelineSwitcher.from_pretrained(str(tmp_path / "folder"))
    assert sw.pipe.unet.dtype == torch.float32 and sw.pipe.device.type == "cpu"
    assert torch.equal(sw.pipe.unet.conv_in.weight, pipe.unet.conv_in.weight)
    tiny = ShiraPipelineSwitcher.from_pretrained("tiny")
    assert torch.equal(tiny.pipe.unet.conv_in.weight, pipe.unet.conv_in.weight)
    with pytest.raises(FileNotFoundError):
        ShiraPipelineSwitcher.from_single_file(str(tmp_path / "missing.safetensors"))
