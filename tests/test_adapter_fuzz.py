"""Random corruptions of saved adapter files: each must raise AdapterError or load a valid adapter."""

import json
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shira_diffusion import AdapterError, SparseAdapter, SparseDelta

KEYS = ("unet.a.to_q", "unet.a.to_k", "text_encoder_2.l.0.q_proj")


def _saved_bytes(tmp_path_factory) -> bytes:
    g = torch.Generator().manual_seed(0)
    deltas = {}
    for i, key in enumerate(KEYS):
        numel = 24 * (8 + 4 * i)
        idx = torch.randperm(numel, generator=g)[: 10 + 5 * i].sort().values
        deltas[key] = SparseDelta(idx, torch.randn(idx.numel(), generator=g).half(), (24, 8 + 4 * i))
    path = tmp_path_factory.mktemp("fuzz") / "a.safetensors"
    SparseAdapter(deltas, {"base_model": "tiny", "mask": "rand"}).save(path)
    return path.read_bytes()


_ORIGINAL: dict = {}


def original(tmp_path_factory) -> bytes:
    if "bytes" not in _ORIGINAL:
        _ORIGINAL["bytes"] = _saved_bytes(tmp_path_factory)
    return _ORIGINAL["bytes"]


def check_outcome(path) -> None:
    try:
        adapter = SparseAdapter.load(path)
    except AdapterError:
        return
    adapter.validate()  # whatever loads must be a valid adapter
    for d in adapter.deltas.values():
        assert d.indices.numel() == d.values.numel()
        if d.nnz:
            assert 0 <= int(d.indices.min()) and int(d.indices.max()) < d.numel


def _header(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _with_header(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)), min_size=1, max_size=8))
def test_flipped_bytes(tmp_path_factory, flips):
    raw = bytearray(original(tmp_path_factory))
    for pos, mask in flips:
        raw[pos % len(raw)] ^= mask
    path = tmp_path_factory.mktemp("f") / "x.safetensors"
    path.write_bytes(bytes(raw))
    check_outcome(path)


@FUZZ
@given(cut=st.integers(min_value=0), extra=st.binary(max_size=64))
def test_cut_or_extended(tmp_path_factory, cut, extra):
    raw = original(tmp_path_factory)
    path = tmp_path_factory.mktemp("c") / "x.safetensors"
    path.write_bytes(raw[: cut % (len(raw) + 1)] + extra)
    check_outcome(path)


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**40), max_value=2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@FUZZ
@given(data=st.data())
def test_edited_header(tmp_path_factory, data):
    header, body = _header(original(tmp_path_factory))
    tensor_keys = [k for k in header if k != "__metadata__"]
    meta = header["__metadata__"]
    edit = data.draw(st.sampled_from(["meta_value", "shape", "dtype", "offsets", "drop", "rename", "shapes_json"]))
    if edit == "meta_value":
        field = data.draw(st.sampled_from(sorted(meta)))
        meta[field] = data.draw(st.text(max_size=40) | _JSONISH.map(json.dumps))
    elif edit == "shapes_json":
        shapes = json.loads(meta["shapes"])
        key = data.draw(st.sampled_from(sorted(shapes)))
        shapes[key] = data.draw(_JSONISH | st.lists(st.integers(min_value=-5, max_value=5000), max_size=3))
        meta["shapes"] = json.dumps(shapes)
    else:
        key = data.draw(st.sampled_from(tensor_keys))
        entry = header[key]
        if edit == "shape":
            entry["shape"] = data.draw(st.lists(st.integers(min_value=0, max_value=400), max_size=3))
        elif edit == "dtype":
            entry["dtype"] = data.draw(st.sampled_from(["F16", "F32", "BF16", "U8", "I32", "I64", "BOOL", "F64", "XX"]))
        elif edit == "offsets":
            entry["data_offsets"] = data.draw(st.lists(st.integers(min_value=0, max_value=len(body) + 10), min_size=2, max_size=2))
        elif edit == "drop":
            del header[key]
        else:
            header[data.draw(st.sampled_from(["unet.z.values", "vae.x.indices", key + "x"]))] = header.pop(key)
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    path.write_bytes(_with_header(header, body))
    check_outcome(path)
