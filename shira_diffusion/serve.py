"""Serving many users and many adapters on many GPUs, on Ray Serve.

Ray Serve does the replica management, autoscaling and routing; this module adds only what is
SHiRA's:

* the multiplexed "model" is an adapter **set** in one canonical id (``a:1+b:0.7``; ``base`` for
  none), so Serve routes a request to a replica that already staged that set
  (``@serve.multiplexed``, LRU per replica);
* a :class:`Replica` (plain Python, testable without Ray) loads the base pipeline once, stages
  adapters from a folder every replica can read, keeps them within a byte budget by least-recent
  use (never evicting the set being written), and renders a list of requests in as few pipeline
  calls as their sets and settings allow (``@serve.batch`` gathers them);
* the ingress (FastAPI) validates the JSON, answers ``GET /adapters`` and ``POST /generate`` with
  a PNG carrying its parameters, names the replica and whether the set was already staged in the
  response headers, and retries a request once when its replica dies.

Run ``shira serve`` on one machine, or ``serve run shira_diffusion.serve:app`` /
``serve run config.yaml`` on a cluster (see the README).
"""

import asyncio
import json
import math
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from fastapi import Request, Response  # gradio's own dependency

# no ``from __future__ import annotations`` here: the ingress's annotations must be the classes
# themselves, as FastAPI reads them in the Ray replica the class was shipped to

NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # adapter names a set id can carry
BASE = "base"
LIMITS = {"steps": (1, 150), "side": (64, 2048), "guidance": (0.0, 30.0)}


class RequestError(ValueError):
    """A request the service refuses, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---- adapter sets ---------------------------------------------------------------------------------


def set_id(adapters: Mapping[str, float] | None) -> str:
    """The canonical id of ``{name: scale}``: names sorted, scales as the shortest float text,
    zero scales dropped; ``base`` for the empty set."""
    parts = []
    for name in sorted(adapters or {}):
        scale = float(adapters[name])
        if not NAME.match(name):
            raise RequestError(422, f"adapter name {name!r}: letters, digits, '.', '_' and '-' only")
        if not math.isfinite(scale):
            raise RequestError(422, f"adapter {name!r}: the scale must be a finite number")
        if scale != 0.0:
            parts.append(f"{name}:{scale!r}")
    return "+".join(parts) or BASE


def parse_set_id(text: str) -> dict[str, float]:
    if text in ("", BASE):
        return {}
    out = {}
    for part in text.split("+"):
        name, _, scale = part.rpartition(":")
        out[name] = float(scale)
    return out


def adapters_folder(source: str | Path | None) -> Path | None:
    """Where the adapters are: a local folder (a shared filesystem path on a cluster), or a hub
    repository (``hf://owner/repo``) fetched once into the local hub cache (its ``*.safetensors``
    files only) through ``huggingface_hub``."""
    if not source:
        return None
    text = str(source)
    if not text.startswith("hf://"):
        if not Path(text).is_dir():
            raise ValueError(f"adapters folder {text!r} does not exist (a hub repository is written hf://owner/repo)")
        return Path(text)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=text.removeprefix("hf://"), allow_patterns=["*.safetensors"]))


def scan(folder: str | Path | None) -> dict[str, Path]:
    """``{name: path}`` of the adapters in ``folder`` (or hub repository) that a set id can name."""
    folder = adapters_folder(folder)
    if folder is None:
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.safetensors")) if NAME.match(p.stem)}


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 5.0
    width: int = 1024
    height: int = 1024
    adapters: tuple[tuple[str, float], ...] = ()

    @property
    def set_id(self) -> str:
        return set_id(dict(self.adapters))

    @property
    def group(self) -> tuple:
        """Requests with equal groups run in one pipeline call."""
        return (self.set_id, self.width, self.height, self.steps, self.guidance)

    @classmethod
    def from_json(cls, body: bytes | str | Mapping, available: set[str] | Mapping, default_size: int = 1024) -> "GenerateRequest":
        """A validated request, or a :class:`RequestError` (400 malformed, 404 unknown adapter,
        422 a value out of range)."""
        if isinstance(body, (bytes, str)):
            try:
                body = json.loads(body or b"{}")
            except ValueError as err:
                raise RequestError(400, f"the body is not JSON: {err}") from None
        if not isinstance(body, Mapping):
            raise RequestError(400, "the body must be a JSON object")
        known = {"prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "adapters"}
        extra = sorted(set(body) - known)
        if extra:
            raise RequestError(422, f"unknown field {extra[0]!r} (fields: {', '.join(sorted(known))})")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError(422, "'prompt' must be a string")
        negative = body.get("negative_prompt") or ""
        if not isinstance(negative, str):
            raise RequestError(422, "'negative_prompt' must be a string")
        adapters = body.get("adapters") or {}
        if not isinstance(adapters, Mapping) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in adapters.values()):
            raise RequestError(422, "'adapters' must be an object of {name: scale}")
        for name in adapters:
            if name not in available:
                raise RequestError(404, f"no adapter named {name!r} (GET /adapters lists them)")
        set_id(adapters)  # names and scales checked
        values = {}
        for field, cast, default in (("seed", int, 0), ("steps", int, 20), ("guidance", float, 5.0),
                                     ("width", int, default_size), ("height", int, default_size)):
            raw = body.get(field, default)
            if isinstance(raw, bool) or not isinstance(raw, (int, float)) or (cast is int and float(raw) != int(raw)):
                raise RequestError(422, f"'{field}' must be a {'whole ' if cast is int else ''}number")
            values[field] = cast(raw)
        lo, hi = LIMITS["steps"]
        if not lo <= values["steps"] <= hi:
            raise RequestError(422, f"'steps' must be between {lo} and {hi}")
        lo, hi = LIMITS["guidance"]
        if not lo <= values["guidance"] <= hi:
            raise RequestError(422, f"'guidance' must be between {lo} and {hi}")
        lo, hi = LIMITS["side"]
        for side in ("width", "height"):
            if not lo <= values[side] <= hi or values[side] % 8:
                raise RequestError(422, f"'{side}' must be a multiple of 8 between {lo} and {hi}")
        if not 0 <= values["seed"] < 2**63:
            raise RequestError(422, "'seed' must be between 0 and 2**63 - 1")
        return cls(prompt, negative, adapters=tuple(sorted((k, float(v)) for k, v in adapters.items() if float(v) != 0.0)), **values)


# ---- one replica ----------------------------------------------------------------------------------


class Replica:
    """One loaded base pipeline serving adapter sets from ``adapters_dir``.

    ``max_adapter_bytes`` bounds what the staged adapters hold (the engine's accounting); staging
    a set evicts the least recently used adapters outside it until it fits.
    """

    def __init__(self, model: str = "demo", dtype: str = "auto", device: str | None = None, offload: str = "none",
                 adapters_dir: str | None = None, max_adapter_bytes: int | None = None, threads: int | None = None,
                 batch_size: int = 1, exact: bool = True) -> None:
        import torch

        from .loading import load_pipeline
        from .pipeline import ShiraPipelineSwitcher

        if threads:
            torch.set_num_threads(threads)
        self.model = model
        self.pipe = load_pipeline(model, device=device, dtype=dtype, offload=offload)
        self.pipe.set_progress_bar_config(disable=True)
        self.switcher = ShiraPipelineSwitcher(self.pipe)
        self.available = scan(adapters_dir)
        self.max_adapter_bytes = max_adapter_bytes
        # exact: every pipeline call has ``batch_size`` images (short batches padded with copies whose
        # images are dropped), so a request's pixels do not depend on what it was batched with
        # (kernels pick their blocking by the batch's size, so a 3-image call and a 1-image call
        # round differently); measured bit-identical across batch mates and positions on CPU
        self.batch_size, self.exact = max(1, int(batch_size)), exact
        self._last_use: dict[str, float] = {}
        self._lock = threading.RLock()  # staging and rendering, one at a time

    def has(self, adapters: Mapping[str, float]) -> bool:
        return all(name in self.switcher.engine.store for name in adapters)

    def ensure(self, adapters: Mapping[str, float]) -> bool:
        """Stage every adapter of the set (evicting others by least-recent use to fit the budget);
        returns whether all were staged already."""
        with self._lock:
            store = self.switcher.engine.store
            already = self.has(adapters)
            for name in adapters:
                self._last_use[name] = time.monotonic()
                if name in store:
                    continue
                if name not in self.available:
                    raise RequestError(404, f"no adapter named {name!r}")
                path = self.available[name]
                self.switcher.load_adapter(path, adapter_name=name)
                if self.max_adapter_bytes is not None:
                    self._make_room(keep=set(adapters))
            return already

    def _make_room(self, keep: set[str]) -> None:
        """Unload the least recently used adapters outside ``keep`` until the store fits its budget."""
        store = self.switcher.engine.store
        for name in sorted((n for n in store.names() if n not in keep), key=lambda n: self._last_use.get(n, 0.0)):
            if store.nbytes <= self.max_adapter_bytes:
                return
            self.switcher.delete_adapters(name)
        if store.nbytes > self.max_adapter_bytes:
            for name in keep & set(store.names()):
                self.switcher.delete_adapters(name)
            raise RequestError(507, f"this adapter set needs {store.nbytes:,}+ bytes, over the replica's adapter budget "
                                    f"({self.max_adapter_bytes:,}; --max-adapter-memory)")

    def render(self, requests: list[GenerateRequest]) -> list[bytes]:
        """PNG bytes for each request, in order; one pipeline call per ``batch_size`` requests of a
        group that share a set and settings (each image is its own seed's)."""
        import torch

        out: dict[int, bytes] = {}
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.group, []).append(i)
        with self._lock:
            for (sid, width, height, steps, guidance), members in groups.items():
                adapters = parse_set_id(sid)
                self.ensure(adapters)
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start:start + self.batch_size]
                    batch = [requests[i] for i in chunk]
                    padded = batch + [batch[-1]] * (self.batch_size - len(batch)) if self.exact else batch
                    images = self.switcher([r.prompt for r in padded], adapters=adapters, negative_prompt=[r.negative_prompt for r in padded],
                                           num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                                           generator=[torch.Generator().manual_seed(r.seed) for r in padded]).images
                    for i, r, image in zip(chunk, batch, images):
                        out[i] = self._png(r, image)
        return [out[i] for i in range(len(requests))]

    def _png(self, r: GenerateRequest, image) -> bytes:
        from .app.pnginfo import adapter_records, params, png_bytes

        return png_bytes(image, params(r.prompt, r.negative_prompt, r.seed, r.steps, type(self.pipe.scheduler).__name__, r.guidance,
                                       r.width, r.height, self.model, adapter_records(r.adapters, self.available)))


# ---- Ray Serve ------------------------------------------------------------------------------------


def deployments(max_batch_size: int = 4, batch_wait_s: float = 0.05, max_sets_per_replica: int = 8):
    """The model and ingress deployment classes (built here so importing this module needs no Ray)."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI(title="shira serve")

    @serve.deployment(name="ShiraModel")
    class ShiraModel:
        def __init__(self, options: dict) -> None:
            self.replica = Replica(**options)
            replica_id = serve.get_replica_context().replica_id
            self.name = str(getattr(replica_id, "unique_id", replica_id))

        @serve.multiplexed(max_num_models_per_replica=max_sets_per_replica)
        async def adapter_set(self, sid: str) -> str:
            """Ray keeps the ids of the sets this replica serves (LRU) and routes by them; the
            adapters themselves live in the replica's store, within its byte budget."""
            await asyncio.to_thread(self.replica.ensure, parse_set_id(sid))
            return sid

        async def generate(self, request: dict) -> dict:
            r = GenerateRequest(**{**request, "adapters": tuple(tuple(a) for a in request["adapters"])})
            routed = serve.get_multiplexed_model_id()
            staged = self.replica.has(dict(r.adapters))
            if routed:
                await self.adapter_set(routed)
            png = await self.render(r)
            return {"png": png, "replica": self.name, "staged": staged}

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def render(self, requests: list[GenerateRequest]) -> list[bytes]:
            return await asyncio.to_thread(self.replica.render, requests)

    @serve.deployment(name="ShiraIngress")
    @serve.ingress(api)
    class ShiraIngress:
        def __init__(self, model, adapters_dir: str | None, default_size: int, affinity: bool = True) -> None:
            self.model = model
            self.available = scan(adapters_dir)
            self.default_size = default_size
            self.affinity = affinity

        @api.get("/adapters")
        async def adapters(self) -> dict:
            return {"adapters": sorted(self.available)}

        @api.post("/generate")
        async def generate(self, request: Request) -> Response:
            try:
                r = GenerateRequest.from_json(await request.body(), self.available, self.default_size)
            except RequestError as err:
                return Response(json.dumps({"error": str(err)}), status_code=err.status, media_type="application/json")
            sid = r.set_id
            handle = self.model.options(multiplexed_model_id=sid) if self.affinity else self.model
            result, attempts = await _with_one_retry(lambda: handle.generate.remote(asdict(r)))
            if result is None:
                return Response(json.dumps({"error": "the replica serving this request died, and so did the retry"}), status_code=503,
                                media_type="application/json")
            return Response(result["png"], media_type="image/png",
                            headers={"X-Shira-Replica": result["replica"], "X-Shira-Staged": "1" if result["staged"] else "0",
                                     "X-Shira-Set": sid, "X-Shira-Attempts": str(attempts)})

    return ShiraModel, ShiraIngress


async def _with_one_retry(call) -> tuple[Any, int]:
    """``(result, attempts)``: a call whose replica died is made once more (Serve routes it to a
    live replica); ``(None, 2)`` when that one dies too."""
    from ray.exceptions import RayActorError  # ActorUnavailableError (a restarting replica) is one

    for attempt in (1, 2):
        try:
            return await call(), attempt
        except RayActorError:
            continue
    return None, 2


def build_app(args: Mapping[str, Any] | None = None):
    """The Ray Serve application (``serve run shira_diffusion.serve:build_app model=demo ...``).

    ``args``: ``model``, ``dtype``, ``device``, ``offload``, ``adapters_dir``, ``replicas``,
    ``num_gpus`` / ``num_cpus`` per replica, ``threads`` per replica, ``max_adapter_mb``,
    ``max_batch_size``, ``batch_wait_ms``, ``max_sets_per_replica``, ``affinity``, ``exact_batches``
    (default true: every call is padded to ``max_batch_size`` images, so batching never changes a pixel).
    """
    args = dict(args or {})
    adapters_dir = args.get("adapters_dir")
    if adapters_dir is None and args.get("model", "demo") == "demo":
        from .demo.model import ADAPTERS_DIR

        adapters_dir = str(ADAPTERS_DIR)
    max_mb = args.get("max_adapter_mb")
    options = {"model": args.get("model", "demo"), "dtype": args.get("dtype", "auto"), "device": args.get("device"),
               "offload": args.get("offload", "none"), "adapters_dir": adapters_dir,
               "max_adapter_bytes": int(float(max_mb) * 2**20) if max_mb not in (None, "") else None,
               "threads": int(args["threads"]) if args.get("threads") else None,
               "batch_size": int(args.get("max_batch_size", 4)),
               "exact": str(args.get("exact_batches", True)).lower() not in ("false", "0", "no")}
    model_cls, ingress_cls = deployments(int(args.get("max_batch_size", 4)), float(args.get("batch_wait_ms", 50)) / 1000,
                                         int(args.get("max_sets_per_replica", 8)))
    resources = {"num_cpus": float(args.get("num_cpus", 1)), "num_gpus": float(args.get("num_gpus", 0))}
    model = model_cls.options(num_replicas=int(args.get("replicas", 1)), ray_actor_options=resources).bind(options)
    default_size = int(args.get("default_size", 64 if options["model"] in ("demo", "tiny") else 1024))
    affinity = str(args.get("affinity", True)).lower() not in ("false", "0", "no")
    return ingress_cls.options(ray_actor_options={"num_cpus": 0}).bind(model, adapters_dir, default_size, affinity)


def __getattr__(name: str):
    if name == "app":  # ``serve run shira_diffusion.serve:app``: the defaults (demo model, one replica)
        return build_app()
    raise AttributeError(name)
