import random
import threading

import pytest
import torch

from conftest import assert_same_state, snapshot
from shira_diffusion import AdapterError, ShiraEngine, SparseAdapter, SparseDelta, find_targets
from shira_diffusion.testing import random_adapter, reference_weights, tiny_sdxl_unet
from shira_diffusion.writer import WeightWriter


def check_state(unet, base_state, adapters, scales):
    """Every parameter equals the reference for ``scales`` (untouched ones equal the base)."""
    prefix = "unet."
    want = reference_weights({prefix + k.removesuffix(".weight"): v for k, v in base_state.items()}, adapters, scales)
    state = unet.state_dict()
    for name, value in state.items():
        ref = want.get(prefix + name.removesuffix(".weight"), base_state[name]) if name.endswith(".weight") else base_state[name]
        assert torch.equal(value, ref), f"{name} differs for {scales}"


def make_setup(dtype=torch.float32, n=3, density=0.05, overlap_subset=True):
    unet = tiny_sdxl_unet(seed=0).to(dtype)
    weights = find_targets({"unet": unet})
    adapters = {}
    for i in range(n):
        subset = dict(list(weights.items())[i * 7 :]) if overlap_subset else weights
        adapters[f"a{i}"] = random_adapter(subset, "rand", density=density, seed=i + 1, dtype=dtype, std=0.5)
    engine = ShiraEngine({"unet": unet})
    for name, adapter in adapters.items():
        engine.stage(name, adapter)
    return unet, engine, adapters


def test_apply_writes_exactly_base_plus_delta_and_restore_is_exact():
    unet, engine, adapters = make_setup()
    base = snapshot(unet)
    engine.apply("a0")
    check_state(unet, base, adapters, {"a0": 1.0})
    assert engine.active == {"a0": 1.0}
    engine.restore()
    assert_same_state(unet, base)
    assert engine.active == {}


def test_fuse_sums_overlapping_deltas_in_fp32_and_casts_once():
    unet, engine, adapters = make_setup(torch.float16, density=0.3)
    base = snapshot(unet)
    a, b = adapters["a0"], adapters["a1"]
    key = next(k for k in b.deltas if k in a.deltas)
    shared = torch.isin(a.deltas[key].indices, b.deltas[key].indices)
    assert shared.sum() > 10  # the test needs real overlap
    engine.apply({"a0": 0.7, "a1": -1.3})
    check_state(unet, base, adapters, {"a0": 0.7, "a1": -1.3})
    # one index by hand: fp16 orig + fp32 (0.7*d0 - 1.3*d1), rounded once
    i = int(a.deltas[key].indices[shared][0])
    d0 = a.deltas[key].values[shared][0].float()
    d1 = b.deltas[key].values[torch.isin(b.deltas[key].indices, torch.tensor([i]))][0].float()
    w0 = base[key.removeprefix("unet.") + ".weight"].view(-1)[i].float()
    live = unet.get_submodule(key.removeprefix("unet.")).weight.view(-1)[i]
    assert live == (w0 + (d0 * 0.7 + d1 * -1.3)).half()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_overlap_of_three_fused_adapters_and_the_one_pass_single_write_match_the_reference(dtype):
    """Three adapters whose indices cover all seven regions of their Venn diagram, with values
    whose fp32 sum rounds differently from a 16-bit running sum; and one adapter at scale 1, which
    the writer adds in the weight's own dtype: both give the fp32-sum-cast-once values, and
    restore gives the base's bits back (signed zeros included)."""
    torch.manual_seed(0)
    base = torch.randn(4, 32).to(dtype) * torch.logspace(-6, 3, 32).to(dtype)  # mixed magnitudes
    base.view(-1)[:4] = torch.tensor([0.0, -0.0, 65000.0 if dtype == torch.float16 else 1e30, 1e-7]).to(dtype)
    key = "unet.proj"
    region = torch.arange(128) % 8  # 0: none, then the seven non-empty subsets of {a, b, c}
    members = {name: torch.nonzero((region & bit) != 0).view(-1) for name, bit in (("a", 1), ("b", 2), ("c", 4))}
    adapters = {}
    for i, (name, idx) in enumerate(members.items()):
        values = (torch.randn(idx.numel(), generator=torch.Generator().manual_seed(i)) * 10.0 ** (i - 2)).to(dtype)
        values[:2] = torch.tensor([-0.0, 3e-3]).to(dtype)
        adapters[name] = SparseAdapter({key: SparseDelta(idx, values, (4, 32))})
    module = torch.nn.Linear(32, 4, bias=False).to(dtype)
    module.weight.data.copy_(base)
    engine = ShiraEngine({"unet": torch.nn.ModuleDict({"proj": module})})
    for name, adapter in adapters.items():
        engine.stage(name, adapter)
    for scales in ({"a": 1.0}, {"c": 1.0}, {"a": 0.3, "b": -1.7}, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 0.7, "b": 0.05, "c": -2.0}):
        engine.apply(scales)
        want = reference_weights({key: base}, adapters, scales)[key]
        assert torch.equal(module.weight.data, want), scales  # every rounding (an exact zero's sign aside)
    engine.restore()
    assert torch.equal(module.weight.data.view(-1).view(torch.uint8), base.view(-1).view(torch.uint8))


def test_zero_scale_is_the_base_and_scale_changes_reuse_indices():
    unet, engine, adapters = make_setup()
    base = snapshot(unet)
    engine.apply({"a0": 0.0})
    assert_same_state(unet, base)
    engine.apply({"a0": 0.5})
    check_state(unet, base, adapters, {"a0": 0.5})
    engine.apply({"a0": 2.0})
    check_state(unet, base, adapters, {"a0": 2.0})
    engine.restore()
    assert_same_state(unet, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_switch_cycles_stay_bit_exact(dtype):
    unet, engine, adapters = make_setup(dtype, n=4, density=0.2)
    base = snapshot(unet)
    rng = random.Random(0)
    names = list(adapters)
    for step in range(300):
        op = rng.random()
        if op < 0.15:
            engine.restore()
        else:
            chosen = rng.sample(names, rng.randint(1, len(names)))
            engine.apply({n: rng.choice([1.0, 0.5, -1.0, rng.uniform(-3, 3)]) for n in chosen})
        if step % 50 == 0:
            check_state(unet, base, adapters, engine.active)
    engine.restore()
    assert_same_state(unet, base)


def test_switch_touches_only_the_union_of_both_sets(monkeypatch):
    unet, engine, adapters = make_setup()
    engine.apply("a0")
    writes: dict[str, set] = {}
    names = {id(w.detach().view(-1).untyped_storage()): k for k, w in find_targets({"unet": unet}).items()}
    original = WeightWriter._write

    def recording(flat, idx, values):
        writes.setdefault(names[id(flat.untyped_storage())], set()).update(idx.tolist())
        original(flat, idx, values)

    monkeypatch.setattr(WeightWriter, "_write", staticmethod(recording))
    engine.apply("a1")
    a, b = adapters["a0"], adapters["a1"]
    assert set(writes) <= a.deltas.keys() | b.deltas.keys()
    for key, written in writes.items():
        allowed = set()
        for ad in (a, b):
            if key in ad.deltas:
                allowed |= set(ad.deltas[key].indices.tolist())
        assert written <= allowed
    assert set(writes) == a.deltas.keys() | b.deltas.keys()


def test_invalid_adapter_raises_before_any_write():
    unet, engine, adapters = make_setup()
    engine.apply("a0")
    before = snapshot(unet)
    weights = find_targets({"unet": unet})
    good = random_adapter(weights, density=0.1, seed=9)
    last = list(good.deltas)[-1]
    bad_shape = dict(good.deltas)
    bad_shape[last] = SparseDelta(good.deltas[last].indices, good.deltas[last].values, (1, good.deltas[last].numel))
    with pytest.raises(AdapterError, match=f"{last}: shape mismatch"):
        engine.stage("bad", SparseAdapter(bad_shape))
    missing = dict(good.deltas)
    missing["unet.down_blocks.9.nope"] = SparseDelta(torch.tensor([0]), torch.tensor([1.0]), (2, 2))
    with pytest.raises(AdapterError, match="unet.down_blocks.9.nope: no such module"):
        engine.stage("bad", SparseAdapter(missing))
    assert_same_state(unet, before)
    assert "bad" not in engine.staged and engine.active == {"a0": 1.0}


def test_adapter_mutated_after_validation_is_caught_at_stage():
    unet, engine, adapters = make_setup(n=1)
    before = snapshot(unet)
    bad = random_adapter(find_targets({"unet": unet}), density=0.1, seed=5)
    next(iter(bad.deltas.values())).values[3] = float("nan")
    with pytest.raises(AdapterError, match="non-finite"):
        engine.stage("bad", bad)
    assert_same_state(unet, before)


@pytest.mark.parametrize("fail_at", [1, 2, 7, 40])
def test_exception_mid_switch_rolls_back_every_weight(monkeypatch, fail_at):
    unet, engine, adapters = make_setup()
    base = snapshot(unet)
    engine.apply({"a0": 1.0, "a2": 0.5})
    before = snapshot(unet)
    calls = {"n": 0}
    original = WeightWriter._write

    def flaky(flat, idx, values):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("injected failure")
        original(flat, idx, values)

    monkeypatch.setattr(WeightWriter, "_write", staticmethod(flaky))
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.apply({"a1": 1.0})
    monkeypatch.setattr(WeightWriter, "_write", staticmethod(original))
    assert_same_state(unet, before)
    assert engine.active == {"a0": 1.0, "a2": 0.5}
    engine.apply("a1")
    check_state(unet, base, adapters, {"a1": 1.0})
    engine.restore()
    assert_same_state(unet, base)


def test_bad_names_and_scales_change_nothing():
    unet, engine, adapters = make_setup()
    engine.apply("a0")
    before = snapshot(unet)
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        engine.apply({"a1": 1.0, "zzz": 1.0})
    with pytest.raises(ValueError, match="must be finite"):
        engine.apply({"a1": float("nan")})
    with pytest.raises(ValueError, match="already loaded"):
        engine.stage("a0", adapters["a0"])
    assert_same_state(unet, before)
    assert engine.active == {"a0": 1.0}


def test_staging_while_active_records_true_originals():
    unet, engine, adapters = make_setup(density=0.4)
    base = snapshot(unet)
    engine.apply({"a0": 1.0, "a1": 1.0})
    weights = find_targets({"unet": unet})
    late = random_adapter(weights, density=0.4, seed=77, std=0.5)
    engine.stage("late", late)
    engine.apply("late")
    check_state(unet, base, {**adapters, "late": late}, {"late": 1.0})
    engine.restore()
    assert_same_state(unet, base)


def test_unstage_active_adapter_keeps_the_rest_applied():
    unet, engine, adapters = make_setup()
    base = snapshot(unet)
    engine.apply({"a0": 1.0, "a1": 0.5})
    engine.unstage("a0")
    assert engine.active == {"a1": 0.5} and "a0" not in engine.staged
    check_state(unet, base, adapters, {"a1": 0.5})
    with pytest.raises(KeyError):
        engine.apply("a0")
    engine.restore()
    assert_same_state(unet, base)


def test_moving_the_model_after_loading_or_while_applied_stays_exact():
    """Nothing is kept on the weights' device for a loaded adapter, and the undo log follows a
    weight that moves (model offload moves the UNet to the GPU and back on every call)."""
    unet, engine, adapters = make_setup()
    unet.to(torch.float16)  # after loading
    base16 = snapshot(unet)
    engine.apply({"a0": 1.0, "a1": 0.5})
    check_state(unet, base16, adapters, {"a0": 1.0, "a1": 0.5})
    for p in unet.parameters():  # moved while applied: new storage for every weight, as .to(device) gives
        p.data = p.data.clone()
    engine.apply("a2")
    check_state(unet, base16, adapters, {"a2": 1.0})
    unet.to(torch.float32)  # a dtype change while applied: restore gives the base as that dtype
    engine.restore()
    assert_same_state(unet, {k: v.float() for k, v in base16.items()})


def test_concurrent_switching_never_tears_state():
    unet, engine, adapters = make_setup(n=4, density=0.2)
    base = snapshot(unet)
    names = list(adapters)
    errors = []

    def writer(seed):
        rng = random.Random(seed)
        for _ in range(40):
            if rng.random() < 0.2:
                engine.restore()
            else:
                engine.apply({n: rng.choice([1.0, 0.5]) for n in rng.sample(names, rng.randint(1, 3))})

    def reader():
        try:
            for _ in range(15):
                with engine.lock:
                    check_state(unet, base, adapters, engine.active)
        except AssertionError as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    check_state(unet, base, adapters, engine.active)
    engine.restore()
    assert_same_state(unet, base)


def test_text_encoder_weights_switch_too(tiny_pipe):
    weights = find_targets(tiny_pipe, ["text_encoder", "text_encoder_2"])
    adapter = random_adapter(weights, "wm", density=0.05, seed=3, std=0.5)
    before = {k: w.detach().clone() for k, w in weights.items()}
    engine = ShiraEngine(tiny_pipe)
    engine.stage("te", adapter)
    engine.apply("te")
    key = next(iter(adapter.deltas))
    assert not torch.equal(weights[key], before[key])
    engine.restore()
    assert all(torch.equal(weights[k], before[k]) for k in weights)


def test_generation_changes_with_adapter_and_returns_bit_exact(tiny_pipe):
    engine = ShiraEngine(tiny_pipe)
    adapter = random_adapter(find_targets(tiny_pipe), density=0.05, seed=4, std=0.3)
    engine.stage("x", adapter)

    def render():
        with engine.lock:
            out = tiny_pipe("a red square", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt")
        return out.images

    base = render()
    engine.apply("x")
    adapted = render()
    engine.restore()
    again = render()
    assert not torch.equal(base, adapted)
    assert torch.equal(base, again)


def parallel(engine, monkeypatch, threads=3):
    """Make every write of ``engine`` take the threaded CPU path, however small."""
    monkeypatch.setattr(engine.writer, "threads", threads)
    monkeypatch.setattr(engine.writer, "PARALLEL_MIN_ENTRIES", 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threaded_writes_give_the_reference_bits_and_restore_exactly(monkeypatch, dtype):
    unet, engine, adapters = make_setup(dtype, density=0.3)
    parallel(engine, monkeypatch)
    base = snapshot(unet)
    threads = set()
    original = WeightWriter._write

    def recording(flat, idx, values):
        threads.add(threading.current_thread().name)
        original(flat, idx, values)

    monkeypatch.setattr(WeightWriter, "_write", staticmethod(recording))
    rng = random.Random(3)
    for _ in range(12):
        chosen = rng.sample(sorted(adapters), rng.randint(1, 3))
        scales = {n: rng.choice([1.0, 0.5, -1.3]) for n in chosen}
        engine.apply(scales)
        check_state(unet, base, adapters, scales)
    engine.restore()
    assert_same_state(unet, base)
    assert len({t for t in threads if t.startswith("shira-writer")}) >= 2 and threading.current_thread().name not in threads


@pytest.mark.parametrize("fail_at", [1, 5, 30])
def test_a_fault_in_one_writer_thread_rolls_back_every_weight(monkeypatch, fail_at):
    unet, engine, adapters = make_setup()
    parallel(engine, monkeypatch)
    engine.apply({"a0": 1.0, "a2": 0.5})
    before = snapshot(unet)
    calls, lock = {"n": 0}, threading.Lock()
    original = WeightWriter._write

    def flaky(flat, idx, values):
        with lock:
            calls["n"] += 1
            fail = calls["n"] == fail_at
        if fail:
            raise RuntimeError("injected failure")
        original(flat, idx, values)

    monkeypatch.setattr(WeightWriter, "_write", staticmethod(flaky))
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.apply({"a1": 1.0, "a2": -0.7})
    monkeypatch.setattr(WeightWriter, "_write", staticmethod(original))
    assert_same_state(unet, before)
    assert engine.active == {"a0": 1.0, "a2": 0.5}
