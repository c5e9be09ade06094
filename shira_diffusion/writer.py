"""The one owner of the adapted weights: writes a set of adapter entries into them, keeps an undo
log of exactly what it overwrote, and puts that back.

* The undo log is captured when a set is written, on the device the weight is on, and holds only
  what the active set overwrote: a loaded, inactive adapter costs the writer nothing. LoRA
  entries cover whole weights, so their undo is a full copy of the weight, kept on the host
  (pinned on CUDA) within ``max_backup_bytes``.
* Restoring writes the saved originals back (``index_copy_`` / ``copy_``); nothing is ever
  subtracted, so no round-off accumulates in any dtype. If the model moved (model offload puts
  the UNet on the GPU for a call and back), the originals follow the weight to its device.
* Fusing sums the scaled deltas in fp32 (or wider) in adapter-name order through a scratch of
  the weight's size (each member reads the running sum at its entries, adds, writes it back; each
  adapter's indices are unique, so this is deterministic on CUDA too), adds them to the originals
  and casts once: the same bits whether a set is new or was written before, with no per-set
  layouts to build or cache.
* A write is transactional: everything is checked before the first write, and an error part-way
  puts every touched weight back to the previous set's exact values.
* On a CPU, weights are written side by side on a few threads: each weight's gathers and scatters
  are too small for PyTorch to split, so one thread would leave the other cores idle.
* Under accelerate's offload hooks (``enable_sequential_cpu_offload``: parameters on ``meta``
  between forwards) the writer writes the hook's CPU weight map, which every forward loads from.
  A weight it cannot write for real is an :class:`AdapterError`, never a silent no-op.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

import torch
from torch import nn

from .adapter import AdapterError, param_of, split_key
from .store import Entry, nbytes
from .targets import pipeline_components, resolve_module


class Member(NamedTuple):
    """One adapter's part in what a weight should hold."""

    name: str
    entry: Entry
    scale: float


Plan = Mapping[str, tuple[Member, ...]]  # key -> members in adapter-name order


@dataclass(eq=False)
class _Undo:
    """What writing one weight overwrote: ``(indices, originals)`` per sparse member, or one full copy."""

    members: tuple[Member, ...]
    records: list[tuple[str, torch.Tensor | None, torch.Tensor]] = field(default_factory=list)  # (name, int32 idx | None, orig)

    @property
    def backup(self) -> torch.Tensor | None:
        return next((orig for _, idx, orig in self.records if idx is None), None)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _same(a: tuple[Member, ...] | None, b: tuple[Member, ...] | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(x.name == y.name and x.entry is y.entry and x.scale == y.scale for x, y in zip(a, b))


def _put(flat: torch.Tensor, idx: torch.Tensor | None, values: torch.Tensor) -> None:
    if idx is None:
        flat.copy_(values)
    else:
        flat.index_copy_(0, idx, values)


class _Workspace:
    """Reused buffers for a write's transient tensors (int64 indices, fp32 sums, casts) and a pool
    of the originals a restore gave back: fresh allocations of this size cost page faults that
    are as slow as the scatter itself on a CPU. The pool is emptied at the end of every write.
    The buffers, sized by the largest weight's entries (a few MB for SDXL adapters), are kept
    between writes on the host, where fresh memory means page faults again, up to ``KEEP_BYTES``;
    device buffers go back to PyTorch's caching allocator, which reuses them without that cost."""

    KEEP_BYTES = 64 * 2**20

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._pool: dict[tuple, list[torch.Tensor]] = {}

    def buf(self, slot: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (slot, dtype, device)
        have = self._bufs.get(key)
        if have is None or have.numel() < n:
            have = self._bufs[key] = torch.empty(max(n, 2 * (have.numel() if have is not None else 0)), dtype=dtype, device=device)
        return have[:n]

    def long(self, slot: str, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``idx`` as int64 on ``device`` (what ``index_copy_`` needs)."""
        if idx.dtype == torch.int64 and idx.device == device:
            return idx
        return self.buf(f"idx{slot}", idx.numel(), torch.int64, device).copy_(idx, non_blocking=True)

    def give(self, t: torch.Tensor) -> None:
        self._pool.setdefault((t.numel(), t.dtype, t.device), []).append(t)

    def take(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        free = self._pool.get((n, dtype, device))
        return free.pop() if free else torch.empty(n, dtype=dtype, device=device)

    def clear(self) -> None:
        self._bufs = {k: b for k, b in self._bufs.items() if b.device.type == "cpu"}
        if self.nbytes > self.KEEP_BYTES:
            self._bufs.clear()
        self._pool.clear()

    @property
    def nbytes(self) -> int:
        return sum(nbytes(b) for b in self._bufs.values())


class WeightWriter:
    """Writes :data:`Plan` s into the weights of ``components`` (a pipeline or ``{"unet": module, ...}``)."""

    def __init__(self, components: Any, max_backup_bytes: int | None = None) -> None:
        self.components = pipeline_components(components)
        self.max_backup_bytes = max_backup_bytes
        self._modules: dict[str, nn.Module] = {}
        self._parents: dict[str, nn.Module | None] = {}
        self._undo: dict[str, _Undo] = {}
        self._main = _Workspace()
        self._spaces: list[_Workspace] = []  # one per worker of a parallel write
        self._local = threading.local()  # which workspace this thread writes with
        self._pool: ThreadPoolExecutor | None = None  # MAX_WORKERS threads, started as writes need them
        self._pool_pid = 0  # the process that started them: a forked child has none

    @property
    def _ws(self) -> _Workspace:
        return getattr(self._local, "ws", self._main)

    # ---- the weights ------------------------------------------------------------------------------
    def module(self, key: str) -> nn.Module:
        """The module whose weight (or, for a ``":bias"`` key, bias) ``key`` names."""
        if key not in self._modules:
            module_key, param = param_of(key)
            module, path = resolve_module(self.components, module_key)  # either text-encoder layout
            module = module.get_base_layer() if hasattr(module, "get_base_layer") else module  # not a PEFT wrapper of it
            if not isinstance(getattr(module, param, None), torch.Tensor):
                raise AdapterError(f"{key}: module {type(module).__name__} has no {param} tensor")
            component = split_key(key)[0]
            parent = self.components[component].get_submodule(path.rpartition(".")[0]) if "." in path else None
            self._modules[key] = module
            self._parents[key] = parent
        return self._modules[key]

    def weight(self, key: str) -> torch.Tensor:
        """The weight (or bias) parameter a key names (on ``meta`` under sequential offload): for shapes."""
        return getattr(self.module(key), param_of(key)[1])

    def live(self, key: str) -> torch.Tensor:
        """The tensor that holds the weight for real, flattened: the parameter itself, or the CPU
        copy in an accelerate offload hook's weight map."""
        module, param = self.module(key), param_of(key)[1]
        if getattr(self._parents[key], "fused_projections", False):  # checked on every write: it may happen after loading
            raise AdapterError(f"{key}: its attention was fused by fuse_qkv_projections(), which computes from a copy; "
                               "call unfuse_qkv_projections() before using adapters")
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", (hook,)) if hook is not None else ():
            weights_map = getattr(h, "weights_map", None) if getattr(h, "offload", False) else None
            if weights_map is None:
                continue
            dataset, name = getattr(weights_map, "dataset", weights_map), getattr(weights_map, "prefix", "") + param
            if hasattr(dataset, "index") and name not in getattr(dataset, "state_dict", {}):
                raise AdapterError(f"{key}: the weight is offloaded to disk (a memory map the engine cannot write for good); "
                                   "offload to the CPU instead (enable_sequential_cpu_offload / enable_model_cpu_offload)")
            try:
                tensor = weights_map[param]
            except KeyError:
                continue
            return self._checked(key, tensor)
        return self._checked(key, getattr(module, param))

    @staticmethod
    def _checked(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "meta":
            raise AdapterError(f"{key}: the weight is on the meta device with no offload map the engine can write "
                               "(not loaded yet, or offloaded by something other than accelerate's CPU offload hooks)")
        if not tensor.is_floating_point():
            raise AdapterError(f"{key}: the weight is {tensor.dtype} (quantized?); adapters write floating-point weights only")
        if not tensor.is_contiguous():
            raise AdapterError(f"{key}: the model's weight is not contiguous; cannot adapt it in place")
        return tensor.detach().view(-1)

    def check(self, key: str, shape: tuple[int, ...]) -> None:
        """Raise unless ``key`` names a weight of ``shape`` that the writer can write for real."""
        have = tuple(self.weight(key).shape)
        if have != tuple(shape):
            raise AdapterError(f"{key}: shape mismatch, adapter {tuple(shape)} vs model {have}")
        self.live(key)

    # ---- writing --------------------------------------------------------------------------------
    @property
    def written(self) -> dict[str, tuple[Member, ...]]:
        return {key: undo.members for key, undo in self._undo.items()}

    @torch.no_grad()
    def write(self, plan: Plan) -> list[torch.device]:
        """Make the weights hold ``plan`` (keys not in it: the base); returns the devices written."""
        old = self.written
        keys = [k for k in dict.fromkeys([*old, *plan]) if not _same(old.get(k), plan.get(k))]
        flats = {key: self.live(key) for key in keys}  # every check before the first write
        self._check_backup_budget(plan, keys, flats)
        touched: list[str] = []  # appended to from every worker (list.append is atomic)
        workers = self._workers(keys, plan, old, flats)
        try:
            if workers > 1:
                self._write_parallel(workers, keys, plan, flats, touched)
            else:
                self._write_keys(keys, plan, flats, touched, None)
        except BaseException:
            self._roll_back(touched, flats, old)
            raise
        finally:
            for ws in (self._main, *self._spaces):
                ws.clear()
        return sorted({f.device for f in flats.values()}, key=str)

    def _write_keys(self, keys: list[str], plan: Plan, flats: dict[str, torch.Tensor], touched: list[str],
                    stop: threading.Event | None) -> None:
        for key in keys:
            if stop is not None and stop.is_set():
                return
            touched.append(key)
            backup = self._restore(key, flats[key], self._write)
            if key in plan:
                self._apply(key, flats[key], plan[key], backup, self._write)

    # ---- parallel writes (CPU) --------------------------------------------------------------------
    PARALLEL_MIN_ENTRIES = 1 << 20  # below this a write takes a few ms: threads would cost more than they give
    MAX_WORKERS = 8
    threads: int | None = None  # writer threads on a CPU (None: PyTorch's intra-op thread count)

    def _workers(self, keys: list[str], plan: Plan, old: Mapping[str, tuple[Member, ...]], flats: dict[str, torch.Tensor]) -> int:
        """How many threads write this switch: on a CPU, one per intra-op thread (each weight's
        gathers and scatters are too small for PyTorch to split them, so weights go side by side);
        on a GPU, or with LoRA members, one."""
        n = min(self.threads or torch.get_num_threads(), self.MAX_WORKERS, len(keys))
        if n < 2 or any(f.device.type != "cpu" for f in flats.values()):
            return 1
        members = [m for k in keys for m in (*old.get(k, ()), *plan.get(k, ()))]
        if any(m.entry.dense for m in members):  # LoRA products: PyTorch already spreads the matmuls over every core
            return 1
        return n if sum(m.entry.count for m in members) >= self.PARALLEL_MIN_ENTRIES else 1

    def _write_parallel(self, workers: int, keys: list[str], plan: Plan, flats: dict[str, torch.Tensor], touched: list[str]) -> None:
        """Weights dealt round-robin to ``workers`` threads, each with its own workspace; every
        weight is written by one thread, so no two threads touch one tensor. Returns (or raises the
        first error) only once every thread has stopped, so a rollback never races a writer."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool, self._pool_pid = ThreadPoolExecutor(self.MAX_WORKERS, thread_name_prefix="shira-writer"), os.getpid()
        while len(self._spaces) < workers:
            self._spaces.append(_Workspace())
        stop, inference = threading.Event(), torch.is_inference_mode_enabled()

        def run(i: int) -> None:
            self._local.ws = self._spaces[i]
            try:
                with torch.no_grad(), torch.inference_mode(inference):  # grad and inference modes are per thread
                    self._write_keys(keys[i::workers], plan, flats, touched, stop)
            except BaseException:
                stop.set()
                raise
            finally:
                del self._local.ws

        futures = [self._pool.submit(run, i) for i in range(workers)]
        try:
            wait(futures)
        except BaseException:  # interrupted while waiting: stop the threads before anyone rolls back
            stop.set()
            wait(futures)
            raise
        for f in futures:
            if f.exception() is not None:
                raise f.exception()

    def _check_backup_budget(self, plan: Plan, keys: list[str], flats: dict[str, torch.Tensor]) -> None:
        if self.max_backup_bytes is None:
            return
        dense = {k for k in self._undo if self._undo[k].backup is not None} - set(keys)
        dense |= {k for k in keys if any(m.entry.dense for m in plan.get(k, ()))}
        need = sum(nbytes(flats[k]) if k in flats else nbytes(self._undo[k].backup) for k in dense)
        if need > self.max_backup_bytes:
            raise AdapterError(f"this set needs {need:,} bytes of full-weight copies for exact restore (LoRA-covered weights), "
                               f"over the budget of {self.max_backup_bytes:,}; raise it or fuse fewer LoRAs")

    def _restore(self, key: str, flat: torch.Tensor, put) -> torch.Tensor | None:
        """Write ``key``'s originals back; returns its full-weight copy if it had one (for reuse)."""
        undo = self._undo.get(key)
        if undo is None:
            return None
        for _, idx, orig in reversed(undo.records):
            index = None if idx is None else self._ws.long("r", idx, flat.device)
            # non_blocking only towards a GPU: a copy to the CPU would be read before it lands
            put(flat, index, orig.to(flat.device, flat.dtype, non_blocking=flat.device.type != "cpu"))
        del self._undo[key]  # only once all of it is back: a failure part-way leaves the log for the rollback
        for _, idx, orig in undo.records:
            if idx is not None:
                self._ws.give(orig)  # the next weight of this write may reuse it
        return undo.backup

    def _apply(self, key: str, flat: torch.Tensor, members: tuple[Member, ...], backup: torch.Tensor | None, put) -> None:
        """Write ``members`` into a weight that holds its base values now; log what was overwritten."""
        undo = self._undo[key] = _Undo(members)
        acc = _accumulate_dtype(flat.dtype)
        device = flat.device
        if any(m.entry.dense for m in members):
            if backup is None or backup.numel() != flat.numel() or backup.dtype != flat.dtype:
                backup = self._host_copy(flat)
            undo.records.append((next(m.name for m in members if m.entry.dense), None, backup))
            base = flat.to(acc)  # the originals: DoRA members normalise base + their delta
            total = torch.zeros(flat.numel(), dtype=acc, device=device)
            for m in members:
                if m.entry.dense:
                    total += m.entry.scaled(device, acc, m.scale, base)
                else:
                    total.index_add_(0, self._ws.long("0", m.entry.indices, device), self._delta(m, m.entry.count, acc, device))
            put(flat, None, (base + total).to(flat.dtype))
            return
        ws = self._ws
        kept = [self._kept_indices(m.entry, device) for m in members]  # one upload each; widened on the device
        indices = [ws.long(str(i), k, device) for i, k in enumerate(kept)]
        for m, k, idx in zip(members, kept, indices):  # every original before any write: overlaps save the same base value
            orig = torch.index_select(flat, 0, idx, out=ws.take(idx.numel(), flat.dtype, device))
            undo.records.append((m.name, k, orig))
        if len(members) == 1:
            m, (_, _, orig), idx = members[0], undo.records[0], indices[0]
            put(flat, idx, self._written(m, orig, idx.numel(), acc))
            return
        # Each member's write holds the deltas' running sum, in name order, at its entries: the
        # first member's deltas go into the scratch, each later member reads the scratch at its
        # entries (zeroed first, so entries no earlier member wrote read 0), adds its deltas and
        # writes the sum back for the members after it. Members write the weight in name order, so
        # an entry shared by several ends with the last one's value: the sum of all of them.
        # Same bits as a dense fp32 sum in name order, with no union and no index_add_.
        scratch = ws.buf("scratch", flat.numel(), acc, device)  # weight-sized; its contents between uses do not matter
        for idx in indices[1:]:
            scratch.index_fill_(0, idx, 0)
        first = self._delta(members[0], indices[0].numel(), acc, device)
        scratch.index_copy_(0, indices[0], first)
        put(flat, indices[0], self._cast(self._plus(undo.records[0][2], first, acc), flat.dtype))
        for i, (m, idx) in enumerate(zip(members[1:], indices[1:]), start=1):
            running = torch.index_select(scratch, 0, idx, out=ws.buf("sum", idx.numel(), acc, device))
            running.add_(self._delta(m, idx.numel(), acc, device))
            if i < len(members) - 1:
                scratch.index_copy_(0, idx, running)
            put(flat, idx, self._cast(self._plus(undo.records[i][2], running, acc), flat.dtype))

    def _written(self, m: Member, orig: torch.Tensor, n: int, acc: torch.dtype) -> torch.Tensor:
        """What one sparse member writes: ``orig + scale * values`` in ``acc``, cast once. At scale 1
        with values in the weight's dtype that is one ``add`` in that dtype: PyTorch computes 16-bit
        adds in fp32 and rounds once, so the bits are the same as the fp32 path's, in one pass."""
        values = m.entry.values
        if m.scale == 1.0 and values.dtype == orig.dtype:
            if values.device != orig.device:
                values = self._ws.buf("upload", n, values.dtype, orig.device).copy_(values, non_blocking=True)
            return torch.add(orig, values, out=self._ws.buf("cast", n, orig.dtype, orig.device))
        return self._cast(self._plus(orig, self._delta(m, n, acc, orig.device), acc), orig.dtype)

    def _delta(self, m: Member, n: int, acc: torch.dtype, device: torch.device) -> torch.Tensor:
        """``scale * values`` of a sparse member in ``acc`` (never the stored tensor modified)."""
        values = m.entry.values
        if values.dtype != acc or values.device != device:
            values = self._ws.buf("delta", n, acc, device).copy_(values, non_blocking=True)
        return values if m.scale == 1.0 else torch.mul(values, m.scale, out=self._ws.buf("scaled", n, acc, device))

    def _plus(self, orig: torch.Tensor, delta: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
        """``orig + delta`` in ``acc``, into a reused buffer."""
        out = self._ws.buf("plus", orig.numel(), acc, orig.device)
        if orig.dtype == acc:
            return torch.add(orig, delta, out=out)
        return out.copy_(orig).add_(delta)

    def _cast(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Cast once, into a reused buffer."""
        return values if values.dtype == dtype else self._ws.buf("cast", values.numel(), dtype, values.device).copy_(values)

    @staticmethod
    def _kept_indices(entry: Entry, device: torch.device) -> torch.Tensor:
        """The undo log's indices: the store's own int32 tensor where the weight is on the host, else a device copy."""
        return entry.indices if entry.indices.device == device else entry.indices.to(device, non_blocking=True)

    @staticmethod
    def _host_copy(flat: torch.Tensor) -> torch.Tensor:
        if flat.device.type == "cpu":
            return flat.clone()
        out = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=torch.cuda.is_available())
        return out.copy_(flat, non_blocking=True)

    def _roll_back(self, touched: list[str], flats: dict[str, torch.Tensor], old: dict[str, tuple[Member, ...]]) -> None:
        """Back to ``old`` exactly: the base on every touched weight, then the old members again."""
        for key in touched:
            self._restore(key, flats[key], _put)
        for key in touched:
            if key in old:
                self._apply(key, flats[key], old[key], None, _put)

    @staticmethod
    def _write(flat: torch.Tensor, idx: torch.Tensor | None, values: torch.Tensor) -> None:
        """Every write of a switch goes through here (tests wrap it to count or to fail)."""
        _put(flat, idx, values)

    # ---- accounting -----------------------------------------------------------------------------
    def held_bytes(self) -> dict[str, dict[str, int]]:
        """``{adapter: {"host": bytes, "device": bytes}}`` held by the undo log now (indices shared
        with the store on the host are not counted twice)."""
        out: dict[str, dict[str, int]] = {}
        for undo in self._undo.values():
            entries = {m.name: m.entry for m in undo.members}
            for name, idx, orig in undo.records:
                held = out.setdefault(name, {"host": 0, "device": 0})
                for t in (orig, idx):
                    if t is None or (t is idx and t is getattr(entries[name], "indices", None)):
                        continue
                    held["host" if t.device.type == "cpu" else "device"] += nbytes(t)
        return out
