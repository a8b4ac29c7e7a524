"""CUDA graphs for the denoising loop: capture a step (UNet + guidance + sampler update) once
per input structure, then replay it.

A denoising step launches ~1-2k kernels; at small batch and resolution (SDXL-Turbo at
512², the 4-step edits) the GPU idles while the host launches them. A CUDA graph records
the launches once and replays them with one call. What must hold (and what this module
arranges):

* every tensor the step reads lives in a **static buffer**; new values (step index,
  noise, latent, guidance scale as a 0-dim tensor, attention-plan indices) are copied in
  before a replay, so changing them needs no re-capture;
* everything else is fixed per graph: the **cache key** is the input tree's structure
  (shapes, dtypes, devices, the attention plan's layer sets and which fields it uses, the
  sampler's class, name and constants) plus the identity of the model and step function;
* capture happens after a **warm-up on a side stream** (cuDNN/cuBLAS handles, Triton
  compilation and autotuning must not happen inside the capture), all graphs of a runner
  share one **memory pool** (``torch.cuda.graph_pool_handle()``);
* when capture is impossible (CPU device, an op that syncs or is not capturable, too many
  distinct shapes) the runner **falls back to eager** and logs the reason once.

Modes: "auto" (capture on CUDA, eager elsewhere), "cuda" (capture, fall back on failure),
"fake" (static buffers and the same body, run eagerly: the plumbing, testable on CPU),
"eager" (call the body on the inputs as given).

    runner = GraphRunner()
    out = runner.run(("step", id(model)), body, inputs, consts)  # body(inputs, consts) -> tree

The body must not modify its inputs, except tensors under an ``AttentionPlan.store``
(marked outputs: copied back to the caller's buffers after each replay). Returned tensors
are the graph's static outputs: valid until the next ``run`` with the same key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .trees import flatten, output_indices, unflatten

log = logging.getLogger("overpaint")

MODES = ("auto", "cuda", "fake", "eager")
MAX_GRAPHS = 32  # distinct keys per runner before new ones run eagerly (dynamic shapes)
MAX_SHORTAGES = 3  # captures that ran out of memory before a key runs eagerly for good
_LOGGED: set[str] = set()


def log_once(reason: str) -> bool:
    """Log a fallback reason once per process; True if it was logged now."""
    if reason in _LOGGED:
        return False
    _LOGGED.add(reason)
    log.warning("cuda graphs: %s; running eagerly", reason)
    return True


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is the device running out of memory (a passing shortage, not a bug)."""
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def capture_blocker(device: torch.device | str) -> str | None:
    """Why graphs cannot be captured on ``device`` (None: they can)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"device is {dev.type}, CUDA graphs need a CUDA device"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


@dataclass
class _Entry:
    """One captured (or fake-captured) body: its static buffers and outputs."""

    spec: object
    static: list[Tensor]  # input leaves, then const leaves
    n_inputs: int
    outputs: object = None  # static output tree (cuda mode)
    graph: object = None  # torch.cuda.CUDAGraph
    writes: list[int] = field(default_factory=list)  # leaf positions copied back after a run
    bound: list = field(default_factory=list)  # (tensor, version) last copied per const leaf
    replays: int = 0


class GraphRunner:
    """Cache of captured step graphs for one model (see the module docstring)."""

    def __init__(self, mode: str = "auto", warmup: int = 2, max_graphs: int = MAX_GRAPHS):
        if mode not in MODES:
            raise ValueError(f"graph mode must be one of {MODES}, got {mode!r}")
        self.mode, self.warmup, self.max_graphs = mode, warmup, max_graphs
        self.cache: dict[tuple, _Entry | None] = {}  # None: this key runs eagerly
        self.pool = None
        self.captures = 0  # graphs captured (for tests and benchmarks)
        self.shortages: dict[tuple, int] = {}  # captures of a key that ran out of memory

    # ---- keys -----------------------------------------------------------------------------
    @staticmethod
    def key(name, inputs, consts=None) -> tuple:
        """The cache key of a call: its name plus the structure of inputs and consts."""
        return (name, flatten(inputs)[1], flatten(consts)[1])

    def resolve(self, leaves: list[Tensor]) -> str:
        """The mode a call actually runs in ("cuda", "fake" or "eager")."""
        if self.mode in ("eager", "fake"):
            return self.mode
        devices = {t.device for t in leaves}
        dev = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
        blocker = capture_blocker(dev) if len(devices) == 1 else f"inputs on several devices {sorted(map(str, devices))}"
        if blocker:
            log_once(blocker)
            return "eager"
        return "cuda"

    # ---- running --------------------------------------------------------------------------
    def run(self, name, body: Callable, inputs, consts=None):
        """body(inputs, consts) through the graph for this key (capturing it on first use)."""
        in_leaves, in_spec = flatten(inputs)
        c_leaves, c_spec = flatten(consts)
        mode = self.resolve(in_leaves + c_leaves)
        if mode == "eager":
            return body(inputs, consts)
        key = (name, in_spec, c_spec)
        if key not in self.cache:
            if len(self.cache) >= self.max_graphs:
                log_once(f"more than {self.max_graphs} distinct step structures (dynamic shapes or plans)")
                return body(inputs, consts)
            self.cache[key] = self._new_entry((in_spec, c_spec), in_leaves, c_leaves)
        entry = self.cache[key]
        if entry is None:
            return body(inputs, consts)
        self._load(entry, in_leaves, c_leaves)
        if mode == "fake":
            out = self._call(entry, body)
        else:
            if entry.graph is None:
                try:
                    captured = self._capture(entry, body)
                except torch.OutOfMemoryError:  # a passing shortage (a server under load): eager this time
                    del self.cache[key]  # its static copies go too; a later call captures afresh
                    self.shortages[key] = self.shortages.get(key, 0) + 1
                    if self.shortages[key] >= MAX_SHORTAGES:
                        self.cache[key] = None
                        log_once(f"capture ran out of memory {MAX_SHORTAGES} times; this step structure runs eagerly")
                    torch.cuda.empty_cache()
                    return body(inputs, consts)
                if not captured:
                    self.cache[key] = None  # this structure runs eagerly from now on
                    return body(inputs, consts)
            entry.graph.replay()
            out = entry.outputs
        entry.replays += 1
        for pos in entry.writes:  # the kernel wrote maps into our static buffers: hand them back
            (in_leaves + c_leaves)[pos].copy_(entry.static[pos])
        return out

    def _new_entry(self, spec, in_leaves, c_leaves) -> _Entry:
        static = [t.detach().clone() for t in in_leaves + c_leaves]
        writes = output_indices(spec[0]) + [len(in_leaves) + i for i in output_indices(spec[1])]
        return _Entry(spec, static, len(in_leaves), writes=writes, bound=[None] * len(c_leaves))

    def _load(self, entry: _Entry, in_leaves, c_leaves) -> None:
        for dst, src in zip(entry.static, in_leaves):
            if dst is not src:
                dst.copy_(src)
        for j, src in enumerate(c_leaves):
            # Consts change rarely (per call, not per step): copy only a new or modified tensor.
            last = entry.bound[j]
            if last is None or last[0] is not src or last[1] != src._version:
                entry.static[entry.n_inputs + j].copy_(src)
                entry.bound[j] = (src, src._version)

    def _call(self, entry: _Entry, body):
        n = entry.n_inputs
        inputs = unflatten(entry.spec[0], entry.static[:n])
        consts = unflatten(entry.spec[1], entry.static[n:])
        return body(inputs, consts)

    def _capture(self, entry: _Entry, body) -> bool:
        """Warm up on a side stream, then capture into the shared pool; False on failure."""
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._call(entry, body)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                entry.outputs = self._call(entry, body)
            entry.graph = graph
            self.captures += 1
            return True
        except Exception as e:  # an uncapturable op (host sync, CPU tensor, ...): eager from now on
            entry.outputs = entry.graph = None
            if is_oom(e):
                raise torch.OutOfMemoryError(str(e)) from e  # not a property of the step: a later call captures
            log_once(f"capture failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            return False

    def clear(self) -> None:
        """Drop every graph and its memory (e.g. before loading other weights)."""
        self.cache.clear()
        self.shortages.clear()
        self.pool = None
