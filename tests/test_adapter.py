import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shira_diffusion import AdapterError, SparseAdapter, SparseDelta, index_codec
from shira_diffusion.masks import budget, make_mask
from shira_diffusion.testing import random_adapter

KEY = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def small_adapter(dtype=torch.float32) -> SparseAdapter:
    deltas = {
        KEY: SparseDelta(torch.tensor([0, 5, 6, 63]), torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=dtype), (8, 8)),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": SparseDelta(
            torch.tensor([3]), torch.tensor([1.25], dtype=dtype), (4, 4)
        ),
    }
    return SparseAdapter(deltas, {"base_model": "tiny", "mask": "rand", "targets": {"unet": ["to_q"]}})


def rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header through ``edit(header_dict)``."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def tensors_of(adapter: SparseAdapter) -> dict[str, torch.Tensor]:
    out = {}
    for key, d in adapter.deltas.items():
        out[f"{key}.values"] = d.values
        out[f"{key}.indices"] = index_codec.encode(d.indices)
    return out


# ---- round trip -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    adapter = small_adapter(dtype)
    loaded = SparseAdapter.load(adapter.save(tmp_path / "a.safetensors"))
    assert list(loaded.deltas) == list(adapter.deltas)
    for key, d in adapter.deltas.items():
        got = loaded.deltas[key]
        assert torch.equal(got.indices.long(), d.indices.long())
        assert got.values.dtype == dtype and torch.equal(got.values, d.values)
        assert got.shape == d.shape
    assert loaded.metadata["base_model"] == "tiny"
    assert loaded.metadata["targets"] == {"unet": ["to_q"]}
    assert loaded.metadata["num_params"] == 5
    assert loaded.metadata["density"] == pytest.approx(5 / 80)
    assert loaded.metadata["dtype"] == str(dtype).replace("torch.", "")


def test_save_casts_values_to_requested_dtype(tmp_path):
    adapter = small_adapter(torch.float32)
    loaded = SparseAdapter.load(adapter.save(tmp_path / "a.safetensors", dtype=torch.float16))
    assert loaded.dtype == torch.float16
    assert torch.equal(loaded.deltas[KEY].values, adapter.deltas[KEY].values.half())


def test_header_names_format_and_provenance(tmp_path):
    path = small_adapter().save(tmp_path / "a.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert header["format"] == "shira" and header["format_version"] == "1"
    assert json.loads(header["shapes"])[KEY] == [8, 8]
    assert json.loads(header["mask"]) == "rand"


def test_derived_facts_and_summary():
    adapter = small_adapter()
    assert adapter.num_params == 5
    assert adapter.density == pytest.approx(5 / 80)
    assert adapter.components == ["text_encoder", "unet"]
    text = adapter.summary()
    assert "5 params" in text and "unet: 1 weights, 4 params (6.2500% of 64)" in text


def test_to_moves_and_casts_without_touching_indices():
    adapter = small_adapter()
    half = adapter.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and adapter.dtype == torch.float32
    assert torch.equal(half.deltas[KEY].indices, adapter.deltas[KEY].indices)


# ---- index codec ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "indices,numel",
    [
        ([], 10),
        ([0], 1),
        ([0, 1, 2, 3, 4], 5),
        ([9], 10),
        ([0, 300, 70000, 70001, 2**20 - 1], 2**20),
        (list(range(0, 1000, 3)), 1000),
    ],
)
def test_codec_round_trip(indices, numel):
    idx = torch.tensor(indices, dtype=torch.int64)
    packed = index_codec.encode(idx)
    assert packed.dtype == torch.uint8 and packed.dim() == 2
    assert torch.equal(index_codec.decode(packed, len(indices), numel).long(), idx)


def test_codec_picks_smallest_bit_width():
    g = torch.Generator().manual_seed(0)
    for density in (0.005, 0.02, 0.05, 0.3, 0.9):
        numel = 100_000
        idx = torch.randperm(numel, generator=g)[: int(density * numel)].sort().values
        packed = index_codec.encode(idx)
        gaps = torch.diff(idx, prepend=torch.tensor([-1]))
        sizes = {b: -(-int(((gaps - 1) // (2**b - 1) + 1).sum()) // 8) * b for b in range(1, 9)}
        assert packed.numel() == min(sizes.values())
        assert torch.equal(index_codec.decode(packed, idx.numel(), numel).long(), idx)


def test_codec_decodes_to_int32_where_the_weight_fits_and_int64_beyond():
    idx = torch.tensor([0, 5, 2**20], dtype=torch.int64)
    packed = index_codec.encode(idx)
    small = index_codec.decode(packed, 3, 2**20 + 1)
    assert small.dtype == torch.int32 and small.tolist() == idx.tolist()
    big = index_codec.decode(packed, 3, 2**31)
    assert big.dtype == torch.int64 and big.tolist() == idx.tolist()


def test_codec_rejects_streams_too_long_or_summing_past_the_weight():
    """More units than the weight has entries cannot be a valid stream. 8-bit units of 255, as
    many as the weight has entries, sum past 2**31: the sum runs in 64 bits whenever it could
    wrap 32, so a wrapped (negative or small) running sum can never pass as an index."""
    with pytest.raises(index_codec.IndexCodecError, match="too long for a weight of 1048576 entries"):
        index_codec.decode(torch.full((2**17 + 1, 8), 255, dtype=torch.uint8), 2**20 + 8, 2**20)
    numel = 2**24
    with pytest.raises(index_codec.IndexCodecError, match="index out of range: 4278190079 >= 16777216"):
        index_codec.decode(torch.full((numel // 8, 8), 255, dtype=torch.uint8), numel, numel)
    with pytest.raises(index_codec.IndexCodecError, match="length mismatch: 3 indices for 4 values"):
        index_codec.decode(index_codec.encode(torch.tensor([1, 2, 3])), 4, 10)
    with pytest.raises(index_codec.IndexCodecError, match="length mismatch: 3 indices for 0 values"):
        index_codec.decode(index_codec.encode(torch.tensor([1, 2, 3])), 0, 10)
    assert index_codec.decode(torch.zeros(1, 3, dtype=torch.uint8), 0, 10).numel() == 0


def test_codec_decodes_streams_of_every_width_one_after_another_on_two_threads():
    """The decoder reuses per-thread buffers: a short stream after a long one (stale bytes past
    its end) and two threads at once must each give exactly their own indices."""
    import threading

    g = torch.Generator().manual_seed(1)
    cases = []
    for numel, density in ((50_000, 0.9), (7, 1.0), (300_000, 0.01), (1000, 0.3), (2**20, 0.002), (64, 0.5), (10**5, 0.05), (10**5, 0.1)):
        idx = torch.randperm(numel, generator=g)[: max(1, int(density * numel))].sort().values
        cases.append((index_codec.encode(idx), idx, numel))
    assert {packed.shape[1] for packed, _, _ in cases} == {1, 2, 4, 6, 8}
    failures = []

    def run(order):
        for _ in range(3):
            for packed, idx, numel in order:
                if not torch.equal(index_codec.decode(packed, idx.numel(), numel).long(), idx):
                    failures.append(numel)

    threads = [threading.Thread(target=run, args=(o,)) for o in (cases, cases[::-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_a_validated_delta_is_checked_again_only_once_changed(tmp_path):
    import pickle

    d = SparseDelta(torch.tensor([1, 3]), torch.tensor([1.0, 2.0]), (4,))
    d.validate()
    assert d._still_valid()  # staging a just-loaded adapter does not scan it again
    loaded = SparseAdapter.load(SparseAdapter({"unet.w": d}).save(tmp_path / "a.safetensors"))
    assert all(x._still_valid() for x in loaded.deltas.values())  # the file reader's checks count
    d.values[0] = float("nan")  # in place: the version counter moves
    with pytest.raises(AdapterError, match="non-finite"):
        d.validate()
    d.values = torch.tensor([1.0, 2.0])
    d.validate()
    d.indices = torch.tensor([3, 1])  # a new tensor object
    with pytest.raises(AdapterError, match="not sorted"):
        d.validate()
    d.indices = torch.tensor([1, 3])
    d.validate()
    assert d.to("cpu") is d and d.to(dtype=torch.float64)._still_valid() is False  # a cast may overflow: checked again
    with torch.inference_mode():  # inference tensors have no version counter: checked each time, never refused
        made = SparseDelta(torch.tensor([1, 3]), torch.tensor([1.0, 2.0]), (4,))
    made.validate()
    assert not made._still_valid()
    copy = pickle.loads(pickle.dumps(d))
    assert not copy._still_valid() and torch.equal(copy.values, d.values)


def test_codec_rejects_unsorted_input():
    with pytest.raises(ValueError, match="sorted"):
        index_codec.encode(torch.tensor([3, 1]))


SDXL_SHAPES = [(640, 640)] * 3 + [(640, 2048)] * 2 + [(1280, 1280)] * 6 + [(1280, 2048)] * 4


@pytest.mark.parametrize("kind", ["rand", "wm", "struct"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_file_is_at_most_1_5x_a_lora_of_equal_size(tmp_path, kind, dtype):
    g = torch.Generator().manual_seed(0)
    weights = {f"unet.block{i}.to_q": torch.randn(s, generator=g) for i, s in enumerate(SDXL_SHAPES)}
    adapter = random_adapter(weights, kind, rank=16, dtype=dtype)
    shira = adapter.save(tmp_path / "shira.safetensors").stat().st_size
    lora = {}
    for key, w in weights.items():
        lora[f"{key}.lora_A.weight"] = torch.zeros(16, w.shape[1], dtype=dtype)
        lora[f"{key}.lora_B.weight"] = torch.zeros(w.shape[0], 16, dtype=dtype)
    lora_params = sum(t.numel() for t in lora.values())
    # struct rounds its budget down to whole rows/columns; compare bytes per trained parameter
    assert adapter.num_params == lora_params or (kind == "struct" and 0.9 * lora_params < adapter.num_params <= lora_params)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    ratio = (shira / adapter.num_params) / ((tmp_path / "lora.safetensors").stat().st_size / lora_params)
    assert ratio <= 1.5, f"{kind} {dtype}: SHiRA file is {ratio:.3f}x the LoRA file"


# ---- validation: bad objects ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "indices,values,shape,message",
    [
        ([0, 2, 1], [1.0, 1.0, 1.0], (4,), "indices are not sorted"),
        ([0, 2, 2], [1.0, 1.0, 1.0], (4,), "duplicate indices"),
        ([0, 4], [1.0, 1.0], (2, 2), r"index out of range: 4 not in \[0, 4\)"),
        ([-1, 2], [1.0, 1.0], (2, 2), r"index out of range: -1"),
        ([0, 1], [1.0], (2, 2), "indices/values length mismatch: 2 indices, 1 values"),
        ([0, 1], [1.0, float("nan")], (2, 2), "non-finite values"),
        ([0, 1], [1.0, float("inf")], (2, 2), "non-finite values"),
        ([0.0, 1.0], [1.0, 1.0], (2, 2), "indices must be a 1-D integer tensor"),
        ([0, 1], [1, 2], (2, 2), "values must be a 1-D floating-point tensor"),
        ([0], [1.0], (0, 2), "invalid weight shape"),
    ],
)
def test_bad_delta_is_rejected_with_key_and_problem(indices, values, shape, message):
    delta = SparseDelta(torch.tensor(indices), torch.tensor(values), shape)
    with pytest.raises(AdapterError, match=message) as err:
        SparseAdapter({KEY: delta})
    assert str(err.value).startswith(KEY)


def test_unknown_component_is_rejected():
    with pytest.raises(AdapterError, match="vae.decoder.x: unknown component 'vae'"):
        SparseAdapter({"vae.decoder.x": SparseDelta(torch.tensor([0]), torch.tensor([1.0]), (2,))})


def test_check_fits_names_shape_mismatch_and_missing_weight():
    adapter = small_adapter()
    shapes = {k: d.shape for k, d in adapter.deltas.items()}
    adapter.check_fits(shapes)
    with pytest.raises(AdapterError, match=r"shape mismatch, adapter \(8, 8\) vs model \(8, 9\)"):
        adapter.check_fits({**shapes, KEY: (8, 9)})
    with pytest.raises(AdapterError, match="no such weight in the model"):
        adapter.check_fits({KEY: (8, 8)})


def test_adapter_error_is_a_value_error():
    assert issubclass(AdapterError, ValueError)


# ---- validation: bad files ------------------------------------------------------------------------


class _Boom:
    triggered = False

    def __reduce__(self):
        return (_trigger, ())


def _trigger():
    _Boom.triggered = True
    return "pwned"


def test_pickle_renamed_is_rejected_and_never_unpickled(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"x": _Boom()}))
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        SparseAdapter.load(path)
    assert not _Boom.triggered


@pytest.mark.parametrize("cut", [0, 4, 8, 20, -10, -1])
def test_truncated_file_is_rejected(tmp_path, cut):
    path = small_adapter().save(tmp_path / "a.safetensors")
    raw = path.read_bytes()
    path.write_bytes(raw[:cut])
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        SparseAdapter.load(path)


def test_random_bytes_are_rejected(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)).numpy().tobytes())
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        SparseAdapter.load(path)


def test_missing_file_and_size_limit(tmp_path):
    with pytest.raises(AdapterError, match="no such file"):
        SparseAdapter.load(tmp_path / "nope.safetensors")
    path = small_adapter().save(tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match="over the 100 byte limit"):
        SparseAdapter.load(path, max_bytes=100)


def test_plain_safetensors_file_is_not_an_adapter(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(AdapterError, match="not a SHiRA adapter"):
        SparseAdapter.load(tmp_path / "model.safetensors")


def _drop_values(t, h):
    del t[f"{KEY}.values"]


def _add_sneaky(t, h):
    t["unet.sneaky.values"] = torch.zeros(2)


def _short_values(t, h):
    t[f"{KEY}.values"] = t[f"{KEY}.values"][:3].clone()


def _nan_values(t, h):
    t[f"{KEY}.values"] = torch.tensor([0.5, float("nan"), 2.0, 3.0])


def _vae_component(t, h):
    for k in list(t):
        t[k.replace("unet.", "vae.", 1)] = t.pop(k)
    h["shapes"] = h["shapes"].replace('"unet.', '"vae.')


@pytest.mark.parametrize(
    "edit,message",
    [
        (_drop_values, f"{KEY}: missing tensor '{KEY}.values'"),
        (_add_sneaky, "unexpected tensor 'unet.sneaky.values'"),
        (_short_values, f"{KEY}: indices/values length mismatch: 4 indices for 3 values"),
        (_nan_values, f"{KEY}: non-finite values"),
        (_vae_component, "unknown component 'vae'"),
    ],
)
def test_bad_tensors_in_file_are_rejected(tmp_path, edit, message):
    adapter = small_adapter()
    tensors, header = tensors_of(adapter), adapter.header()
    edit(tensors, header)
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata=header)
    with pytest.raises(AdapterError, match=message):
        SparseAdapter.load(tmp_path / "a.safetensors")


def _set_shape(shape):
    def edit(meta):
        shapes = json.loads(meta["shapes"])
        shapes[KEY] = shape
        meta["shapes"] = json.dumps(shapes)

    return edit


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update(format_version="99"), "unknown format version '99'"),
        (lambda m: m.update(mask="{not json"), "header field 'mask' is not valid JSON"),
        (_set_shape([4, 4]), f"{KEY}: index out of range: 63 >= 16"),
        (_set_shape([0, 8]), f"{KEY}: invalid shape"),
        (lambda m: m.pop("shapes"), "header field 'shapes' is missing"),
    ],
)
def test_bad_header_is_rejected(tmp_path, edit, message):
    path = small_adapter().save(tmp_path / "a.safetensors")
    rewrite_header(path, lambda h: edit(h["__metadata__"]))
    with pytest.raises(AdapterError, match=message):
        SparseAdapter.load(path)


def test_wm_mask_round_trips_through_file(tmp_path):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    idx = make_mask(w, "wm", rank=4)
    assert idx.numel() == budget(w.shape, rank=4)
    adapter = SparseAdapter({KEY: SparseDelta(idx, torch.ones(idx.numel()), (64, 96))})
    loaded = SparseAdapter.load(adapter.save(tmp_path / "a.safetensors"))
    assert torch.equal(loaded.deltas[KEY].indices.long(), idx)


def test_header_derives_fingerprint_and_targets(tmp_path, tiny_pipe):
    from shira_diffusion import find_targets, fingerprint

    weights = find_targets(tiny_pipe, ["unet", "text_encoder"])
    adapter = random_adapter(weights, density=0.05)
    loaded = SparseAdapter.load(adapter.save(tmp_path / "a.safetensors"))
    assert loaded.metadata["fingerprint"] == fingerprint(weights)
    assert loaded.metadata["targets"] == {
        "text_encoder": ["k_proj", "out_proj", "q_proj", "v_proj"],
        "unet": ["to_k", "to_out.0", "to_q", "to_v"],
    }
    assert loaded.metadata["base_model"] is None
