"""``shira serve``: request validation and the replica without Ray; then a local Ray Serve with two
replicas of the demo model, driven over HTTP on loopback."""

import io
import json
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from shira_diffusion.app.pnginfo import read_parameters
from shira_diffusion.demo.model import ADAPTERS_DIR
from shira_diffusion.serve import GenerateRequest, Replica, RequestError, build_app, parse_set_id, scan, set_id
from shira_diffusion.testing import free_port

AVAILABLE = scan(ADAPTERS_DIR)
PROMPT = "a sks shape on a gray background, in the center, in bluefire style"
SETS = [{}, {"sks-shira-rand": 1.0}, {"bluefire-shira-rand": 1.0}, {"sks-shira-rand": 1.0, "bluefire-shira-rand": 0.7},
        {"paintings-shira-wm": 1.0}, {"sks-lora": 1.0, "paintings-lora": 0.5}]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_set_ids_are_canonical():
    assert set_id({"b": 0.7, "a": 1}) == set_id({"a": 1.0, "b": 0.7}) == "a:1.0+b:0.7"
    assert set_id({}) == set_id({"a": 0.0}) == "base"
    assert parse_set_id("a:1.0+b:0.7") == {"a": 1.0, "b": 0.7} and parse_set_id("base") == {}
    with pytest.raises(RequestError, match="letters, digits"):
        set_id({"a+b": 1.0})


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "the body is not JSON"),
    (b"[1, 2]", 400, "the body must be a JSON object"),
    ({"prompt": 3}, 422, "'prompt' must be a string"),
    ({"prompt": "x", "adapters": {"nope": 1}}, 404, "no adapter named 'nope' (GET /adapters lists them)"),
    ({"prompt": "x", "width": 100}, 422, "'width' must be a multiple of 8 between 64 and 2048"),
    ({"prompt": "x", "steps": 0}, 422, "'steps' must be between 1 and 150"),
    ({"prompt": "x", "seed": 1.5}, 422, "'seed' must be a whole number"),
    ({"prompt": "x", "code": "import os"}, 422, "unknown field 'code'"),
])
def test_bad_requests_are_4xx_with_a_reason(body, status, message):
    with pytest.raises(RequestError) as err:
        GenerateRequest.from_json(body if isinstance(body, bytes) else json.dumps(body), AVAILABLE, 64)
    assert err.value.status == status and message in str(err.value)


@pytest.fixture(scope="module")
def replica():
    return Replica("demo", adapters_dir=str(ADAPTERS_DIR), batch_size=4)


def test_a_replica_batches_by_set_and_settings(replica):
    requests = [GenerateRequest(PROMPT, seed=s, steps=4, width=64, height=64, adapters=tuple(sorted(SETS[k].items())))
                for s, k in ((1, 1), (2, 1), (3, 3), (4, 1))]
    calls = []
    original = replica.switcher.__class__.__call__

    def counting(self, prompt=None, *args, **kwargs):
        calls.append(len(prompt))
        return original(self, prompt, *args, **kwargs)

    replica.switcher.__class__.__call__ = counting
    try:
        together = replica.render(requests)
    finally:
        replica.switcher.__class__.__call__ = original
    assert calls == [4, 4]  # one call per (set, settings) group, each padded to the batch size
    for r, png in zip(requests, together):
        assert np.array_equal(pixels(png), pixels(replica.render([r])[0]))  # batched or alone: the same pixels
        params = read_parameters(Image.open(io.BytesIO(png)))
        assert params["seed"] == r.seed and [a["name"] for a in params["adapters"]] == [n for n, _ in r.adapters]
    replica.exact = False
    try:
        loose = replica.render(requests)
    finally:
        replica.exact = True
    # unpadded, a 3-image call may round differently from a 1-image one (kernels block by batch size)
    assert max(np.abs(pixels(a) - pixels(b)).max() for a, b in zip(loose, together)) <= 1


def test_a_replica_evicts_least_recently_used_adapters_to_fit_its_budget(replica):
    engine = replica.switcher.engine
    for name in list(engine.staged):
        replica.switcher.delete_adapters(name)
    replica.ensure({"sks-shira-rand": 1.0})
    one = engine.store.nbytes
    replica.switcher.delete_adapters("sks-shira-rand")
    replica.max_adapter_bytes = int(2.5 * one)  # room for two
    try:
        assert replica.ensure({"sks-shira-rand": 1.0}) is False
        assert replica.ensure({"bluefire-shira-rand": 1.0}) is False
        assert replica.ensure({"sks-shira-rand": 1.0}) is True  # staged already; now the most recent
        replica.ensure({"paintings-shira-rand": 1.0})
        assert "bluefire-shira-rand" not in engine.staged and {"sks-shira-rand", "paintings-shira-rand"} <= set(engine.staged)
        assert engine.store.nbytes <= replica.max_adapter_bytes
        with pytest.raises(RequestError, match="over the replica's adapter budget") as err:
            replica.ensure({n: 1.0 for n in ("sks-shira-grad", "bluefire-shira-grad", "paintings-shira-grad")})
        assert err.value.status == 507
    finally:
        replica.max_adapter_bytes = None


# ---- Ray Serve --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service():
    import ray  # the serve extra, which the test command installs
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"replicas": 2, "num_cpus": 1, "threads": 1, "max_sets_per_replica": 3, "batch_wait_ms": 30,
              "max_adapter_mb": 1.5}  # about three demo adapters per replica: no replica holds every set
    serve.run(build_app(common), name="shira", route_prefix="/")
    serve.run(build_app({**common, "affinity": False}), name="shira-baseline", route_prefix="/baseline")  # Serve's default routing
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def post(url: str, body) -> tuple[int, object, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/generate", data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.headers, r.read()  # headers: case-insensitive
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def request(k: int, seed: int) -> dict:
    return {"prompt": PROMPT, "seed": seed, "steps": 4, "adapters": SETS[k]}


def test_http_api(service):
    with urllib.request.urlopen(service + "/adapters", timeout=60) as r:
        assert json.loads(r.read())["adapters"] == sorted(AVAILABLE)
    status, headers, png = post(service, request(3, 5))
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert headers["X-Shira-Set"] == "bluefire-shira-rand:0.7+sks-shira-rand:1.0" and headers["X-Shira-Replica"]
    params = read_parameters(Image.open(io.BytesIO(png)))
    assert params["seed"] == 5 and params["width"] == 64 and {a["name"] for a in params["adapters"]} == set(SETS[3])
    status, _, body = post(service, b"{oops")
    assert status == 400 and "not JSON" in json.loads(body)["error"]
    status, _, body = post(service, {"prompt": "x", "adapters": {"../../etc/passwd": 1}})
    assert status == 404


def test_concurrent_mixed_sets_stay_on_replicas_that_staged_them(service):
    """A few hundred requests over 6 sets with Zipf-like popularity: every answer has its solo
    answer's pixels, and nearly every one was served by a replica that already had its set staged."""
    rng = random.Random(0)
    weights = [1 / (i + 1) for i in range(len(SETS))]
    load = [(rng.choices(range(len(SETS)), weights)[0], rng.randrange(4)) for _ in range(200)]
    solo = {}
    for k, seed in sorted(set(load)):
        status, _, png = post(service, request(k, seed))
        assert status == 200
        solo[k, seed] = pixels(png)
    shares = {}
    for route in ("", "/baseline"):
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda ks: post(service + route, request(*ks)), load))
        assert all(status == 200 for status, _, _ in answers)
        assert all(np.array_equal(pixels(png), solo[ks]) for ks, (_, _, png) in zip(load, answers))
        assert len({h["X-Shira-Replica"] for _, h, _ in answers}) == 2  # both replicas served
        shares[route] = sum(h["X-Shira-Staged"] == "1" for _, h, _ in answers) / len(answers)
    print(f"already staged: {shares['']:.3f} with set affinity, {shares['/baseline']:.3f} with Serve's default routing")
    assert shares[""] >= 0.8 and shares[""] >= shares["/baseline"], shares


def test_a_replica_that_dies_mid_run_loses_no_request(service):
    import ray

    load = [(k % len(SETS), k % 3) for k in range(40)]
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "::shira#ShiraModel" in a["name"]]
    assert len(replicas) == 2
    victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    victim_id = victim._actor_id.hex()

    def kill_soon():
        time.sleep(1.0)
        ray.kill(victim, no_restart=True)

    with ThreadPoolExecutor(9) as pool:
        killer = pool.submit(kill_soon)
        answers = list(pool.map(lambda ks: post(service, request(*ks)), load))
        killer.result()
    assert [status for status, _, _ in answers] == [200] * len(load)  # every request answered, once each (one answer per call)
    alive = {ray.get_actor(a["name"], namespace=a["namespace"])._actor_id.hex()
             for a in ray.util.list_named_actors(all_namespaces=True) if "::shira#ShiraModel" in a["name"]}
    assert victim_id not in alive  # the kill landed: Serve replaced that replica
    retried = sum(h["X-Shira-Attempts"] == "2" for _, h, _ in answers)
    print(f"{retried} of {len(answers)} requests were retried on another replica")


def test_the_cluster_config_builds_and_the_command_documents_its_flags():
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from ray.serve import Application

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "examples" / "serve_config.yaml").read_text())
    [app] = config["applications"]
    assert app["import_path"] == "shira_diffusion.serve:build_app"
    assert isinstance(build_app(app["args"]), Application)  # nothing starts: the model loads in the replicas
    out = subprocess.run([sys.executable, "-m", "shira_diffusion", "serve", "--help"], capture_output=True, text=True, timeout=120)
    for flag in ("--model", "--adapters-dir", "--replicas", "--num-gpus", "--max-adapter-memory", "--max-batch-size", "--no-affinity",
                 "--host"):
        assert flag in out.stdout


def test_adapters_from_a_hub_repository_are_fetched_once_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    import shira_diffusion.serve as serving

    (tmp_path / "style.safetensors").write_bytes(AVAILABLE["sks-lora"].read_bytes())
    (tmp_path / "bad name!.safetensors").write_bytes(b"x")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):  # the hub is out of reach here; the call is what is checked
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert serving.scan("hf://team/adapters") == {"style": tmp_path / "style.safetensors"}
    assert calls == [("team/adapters", ["*.safetensors"])]
    with pytest.raises(ValueError, match="does not exist"):
        serving.scan(tmp_path / "missing")
