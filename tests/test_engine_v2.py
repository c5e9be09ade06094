"""Where the engine's state lives, and the model setups it must work under: accelerate offload,
weights it cannot write, loading while a generation runs, LoRA strength changes."""

import threading

import pytest
import torch

from conftest import assert_same_state, snapshot
from shira_diffusion import AdapterError, ShiraPipelineSwitcher, find_targets
from shira_diffusion.testing import kohya_lora_file, random_adapter, tiny_sdxl_pipeline


def render(sw, adapters):
    return sw("a red square", adapters=adapters, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    weights = find_targets(tiny_sdxl_pipeline(seed=0), ["unet", "text_encoder", "text_encoder_2"])
    paths = [random_adapter(weights, "rand", density=0.05, seed=s, std=0.3).save(folder / f"{n}.safetensors")
             for s, n in ((1, "a"), (2, "b"))]
    return [*paths, kohya_lora_file(folder / "lora.safetensors", seed=3, std=0.3)]


def unet_weights(pipe) -> dict[str, torch.Tensor]:
    """The UNet's real weights: from accelerate's offload map where the parameters are on meta."""
    out = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            hook = getattr(module, "_hf_hook", None)
            weights_map = getattr(hook, "weights_map", None) if getattr(hook, "offload", False) else None
            out[name] = (weights_map["weight"] if weights_map is not None else module.weight).detach().clone()
    return out


def sequential_offload(pipe):
    """What enable_sequential_cpu_offload does to the UNet: accelerate's cpu_offload, weights on meta between
    forwards (on the text encoders too it trips over transformers 5 in accelerate itself, adapters or not)."""
    from accelerate import cpu_offload

    cpu_offload(pipe.unet, execution_device="cpu")
    assert pipe.unet.conv_in.weight.device.type == "meta"


def model_offload(pipe):
    pipe.enable_model_cpu_offload(device="cpu")


@pytest.mark.parametrize("offload", [model_offload, sequential_offload], ids=["model", "sequential"])
def test_adapters_apply_fuse_and_restore_exactly_under_accelerate_offload(adapter_files, offload):
    plain = ShiraPipelineSwitcher(tiny_sdxl_pipeline(seed=0))
    for path in adapter_files:
        plain.load_adapter(path)
    pipe = tiny_sdxl_pipeline(seed=0)
    offloaded = ShiraPipelineSwitcher(pipe)
    for path in adapter_files[::2]:  # a LoRA and a SHiRA adapter loaded before offloading is switched on ...
        offloaded.load_adapter(path)
    offload(pipe)
    offloaded.load_adapter(adapter_files[1])  # ... and one after
    base = unet_weights(pipe)
    for adapters in (None, "a", {"a": 1.0, "b": 0.7}, {"a": 0.5, "lora": 1.0}, "b"):
        assert torch.equal(render(offloaded, adapters), render(plain, adapters)), adapters
    assert not torch.equal(render(offloaded, "a"), render(offloaded, None))  # the adapter does something
    offloaded.disable_adapters()
    after = unet_weights(pipe)
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)


def test_weights_the_engine_cannot_write_are_refused_at_load(adapter_files):
    pipe = tiny_sdxl_pipeline(seed=0)
    pipe.fuse_qkv_projections()
    with pytest.raises(AdapterError, match="fused by fuse_qkv_projections"):
        ShiraPipelineSwitcher(pipe).load_adapter(adapter_files[0])

    pipe = tiny_sdxl_pipeline(seed=0)  # fused after loading: refused at the next switch, nothing written
    sw = ShiraPipelineSwitcher(pipe)
    sw.load_adapter(adapter_files[0])
    pipe.fuse_qkv_projections()
    base = snapshot(pipe.unet)
    with pytest.raises(AdapterError, match="fused by fuse_qkv_projections"):
        sw.set_adapters("a")
    assert_same_state(pipe.unet, base) and sw.get_active_adapters() == []

    pipe = tiny_sdxl_pipeline(seed=0)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    module = pipe.unet.get_submodule(key.removeprefix("unet."))
    module.weight = torch.nn.Parameter(torch.zeros(module.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(AdapterError, match=f"{key}: the weight is torch.int8"):
        ShiraPipelineSwitcher(pipe).load_adapter(adapter_files[0])

    pipe = tiny_sdxl_pipeline(seed=0)
    module = pipe.unet.get_submodule(key.removeprefix("unet."))
    module.weight = torch.nn.Parameter(torch.empty(module.weight.shape, device="meta"))  # no hook holds the real one
    sw = ShiraPipelineSwitcher(pipe)
    with pytest.raises(AdapterError, match=f"{key}: the weight is on the meta device"):
        sw.load_adapter(adapter_files[0])
    assert sw.list_adapters() == {}


def test_load_adapter_completes_while_a_generation_holds_the_lock(adapter_files):
    sw = ShiraPipelineSwitcher(tiny_sdxl_pipeline(seed=0))
    holding, release, done = threading.Event(), threading.Event(), threading.Event()

    def generation():
        with sw.engine.lock:
            holding.set()
            release.wait(30)

    worker = threading.Thread(target=generation)
    worker.start()
    holding.wait(10)
    try:
        loader = threading.Thread(target=lambda: (sw.load_adapter(adapter_files[0], adapter_name="late"), done.set()))
        loader.start()
        assert done.wait(30), "load_adapter waited for the generation's lock"
        assert "late" in sw.list_adapters()
    finally:
        release.set()
        worker.join()
        loader.join()


def test_inactive_adapters_hold_only_their_compact_host_copy(adapter_files):
    sw = ShiraPipelineSwitcher(tiny_sdxl_pipeline(seed=0))
    for path in adapter_files:
        sw.load_adapter(path)
    listed = sw.list_adapters()
    for name in ("a", "b"):
        stored = sw.engine.store.get(name)
        assert listed[name]["device_bytes"] == 0 and listed[name]["host_bytes"] == stored.nbytes
        entry = next(iter(stored.entries.values()))
        assert entry.indices.dtype == torch.int32 and entry.values.dtype == torch.float32 and not entry.indices.is_pinned()
        adapter = sw.get_adapter(name)
        assert stored.nbytes == adapter.num_params * (4 + 4)  # int32 index + fp32 value per entry, nothing else
        assert stored.nbytes <= 2.2 * listed[name]["bytes"]
    sw.set_adapters("a")
    active = sw.list_adapters()["a"]
    originals = sw.get_adapter("a").num_params * 4  # what it overwrote, in the weights' fp32; indices shared with the store
    assert active["host_bytes"] == sw.engine.store.get("a").nbytes + originals and active["device_bytes"] == 0
    sw.disable_adapters()
    assert sw.list_adapters()["a"]["host_bytes"] == sw.engine.store.get("a").nbytes


def test_changing_a_lora_strength_ten_times_holds_what_one_change_holds(adapter_files):
    pipe = tiny_sdxl_pipeline(seed=0)
    base = snapshot(pipe.unet)
    sw = ShiraPipelineSwitcher(pipe)
    sw.load_adapter(adapter_files[2])
    sw.set_adapters("lora", 1.0)
    sw.set_adapters("lora", 0.8)
    once = sw.list_adapters()["lora"]
    backups = [r[2] for u in sw.engine.writer._undo.values() for r in u.records]
    for strength in (0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 1.5, -0.5, 0.8):
        sw.set_adapters("lora", strength)
    assert sw.list_adapters()["lora"] == once
    assert [r[2] for u in sw.engine.writer._undo.values() for r in u.records] == backups  # the same copies, reused
    covered = sum(w.numel() * w.element_size() for k, w in find_targets(pipe, ["unet", "text_encoder", "text_encoder_2"]).items()
                  if k in sw.get_adapter("lora").deltas)
    assert once["host_bytes"] == sw.engine.store.get("lora").nbytes + covered  # one full copy per covered weight
    sw.disable_adapters()
    assert_same_state(pipe.unet, base)


def test_full_weight_copies_stay_within_their_budget(adapter_files):
    pipe = tiny_sdxl_pipeline(seed=0)
    sw = ShiraPipelineSwitcher(pipe, max_backup_bytes=1000)
    sw.load_adapter(adapter_files[2])
    base = snapshot(pipe.unet)
    with pytest.raises(AdapterError, match="over the budget of 1,000"):
        sw.set_adapters("lora")
    assert_same_state(pipe.unet, base) and sw.get_active_adapters() == []


def test_store_budget_refuses_an_adapter_that_does_not_fit(adapter_files):
    sw = ShiraPipelineSwitcher(tiny_sdxl_pipeline(seed=0), max_adapter_bytes=10_000)
    with pytest.raises(AdapterError, match="over the store's budget of 10,000"):
        sw.load_adapter(adapter_files[0])
    assert sw.list_adapters() == {}


def test_separate_unet_and_text_encoder_strengths():
    """``{component: scale}`` per adapter (diffusers' set_adapters form): each component's weights
    get their own strength, components left out 1.0; equal ones fold to one number."""
    from shira_diffusion.testing import reference_weights

    pipe = tiny_sdxl_pipeline(seed=0)
    weights = find_targets(pipe, ["unet", "text_encoder", "text_encoder_2"])
    base = {k: w.detach().clone() for k, w in weights.items()}
    a = random_adapter(weights, "rand", density=0.05, seed=1, std=0.3)
    sw = ShiraPipelineSwitcher(pipe)
    sw.load_adapter(a, "a")
    sw.set_adapters("a", {"unet": 0.5, "text_encoder": 0.0})
    assert sw.engine.active == {"a": {"unet": 0.5, "text_encoder": 0.0, "text_encoder_2": 1.0}}
    for key, w in weights.items():
        scale = {"unet": 0.5, "text_encoder": 0.0, "text_encoder_2": 1.0}[key.split(".")[0]]
        want = reference_weights(base, {"a": a}, {"a": scale}).get(key, base[key]) if scale else base[key]
        assert torch.equal(w.detach(), want), key
    sw.set_adapters(["a"], [{"unet": 0.7, "text_encoder": 0.7, "text_encoder_2": 0.7}])
    assert sw.engine.active == {"a": 0.7}
    with pytest.raises(ValueError, match="unknown component 'vae'"):
        sw.set_adapters("a", {"vae": 1.0})
    assert sw.engine.active == {"a": 0.7}
    sw.set_adapters(None)
    assert all(torch.equal(w.detach(), base[k]) for k, w in weights.items())


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_state_lives_where_the_weights_and_the_store_say(monkeypatch, device):
    """Placement with the weights' device as a parameter. On a CPU-only machine ``meta`` stands in
    for a GPU (data-free, so the writer's refusal of meta weights is lifted for this test only):
    loaded adapters stay on the host, the undo log of the active set lives on the weights' device
    and is all that does, and the accounting says so; after a restore nothing is left there."""
    from shira_diffusion import ShiraEngine, SparseAdapter, SparseDelta
    from shira_diffusion.writer import WeightWriter

    if device == "meta":
        monkeypatch.setattr(WeightWriter, "_checked", staticmethod(lambda key, tensor: tensor.detach().view(-1)))
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(16, 8, bias=False, device=device), "b": torch.nn.Linear(16, 8, bias=False, device=device)})
    engine = ShiraEngine({"unet": model}, pin=False)
    adapters = {name: SparseAdapter({f"unet.{m}": SparseDelta(torch.arange(s, 128, 4), torch.full((len(range(s, 128, 4)),), 0.5), (8, 16))
                                     for m in ("a", "b")}) for s, name in ((0, "x"), (1, "y"))}
    for name, adapter in adapters.items():
        engine.stage(name, adapter)
    entries = 2 * 32  # per adapter: two weights of 32 entries
    compact = entries * (4 + 4)  # int32 index + fp32 value
    for entry in engine.store.get("x").entries.values():
        assert entry.indices.device.type == "cpu" and entry.values.device.type == "cpu"
    assert engine.memory() == {n: {"host_bytes": compact, "device_bytes": 0} for n in ("x", "y")}
    engine.apply({"x": 1.0, "y": 0.5})
    on_device = entries * 4 + (entries * 4 if device != "cpu" else 0)  # originals, plus indices uploaded to a device
    for undo in engine.writer._undo.values():
        for _, idx, orig in undo.records:
            assert orig.device.type == device and idx.device.type == device and idx.dtype == torch.int32
    held = {"host_bytes": compact + (on_device if device == "cpu" else 0), "device_bytes": on_device if device != "cpu" else 0}
    assert engine.memory() == {"x": held, "y": held}
    engine.apply("y")
    assert engine.memory()["x"] == {"host_bytes": compact, "device_bytes": 0}  # no longer active: nothing on the device
    engine.restore()
    assert engine.memory() == {n: {"host_bytes": compact, "device_bytes": 0} for n in ("x", "y")}
    assert engine.writer._undo == {}
