"""The one denoising loop: every program's rows, one model call per step.

    results = run([program_a, program_b, ...], denoiser)

Each step the loop groups live programs whose rows can share a call (same model, latent
shape and dtype, conditioning of the same form), concatenates their rows -- any methods,
any step indices: rows carry their own timesteps -- merges their attention plans with
row offsets (:mod:`engine.step.plans`), makes **one model call per group**, splits the
output and lets each program combine and advance. Programs that are done leave; new
ones may join between steps (:meth:`Loop.add`), which is what step-level continuous
batching in a server is built on.

Batch invariance. A row's result never depends on the *values* of other rows; what can
change it is the *shape* of the call: a GEMM or convolution picks its kernel (and so its
summation order) by batch size, most of all for tiny GEMMs and on GPUs. Always: rows
that need no attention maps never take the explicit map-storing path because a
neighbour stores maps (``store_rows``), and the per-row vectors (timestep embeddings) of
each program meet their GEMMs as one segment of its own (``models.layers.row_segments``),
so a request alone computes exactly as diffusers does and batched agrees with that to
float rounding (convolutions still pick algorithms by batch size). With ``batch_invariant=True`` every call also has exactly
``bucket_rows`` rows (idle rows pad it; a group larger than a bucket is split between
programs) and per-row vectors run in fixed blocks: each call has one shape whatever
shares it (what GPU kernels need), and a request's result is bit-identical to the
request run alone the same way.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch
from tqdm.auto import tqdm

from .plans import merge
from .program import Program, SamplerProgram, drawn_noise
from .denoiser import RowCond

BUCKET_ROWS = 32  # rows of every call in batch-invariant mode
_CACHE = 64  # merged plans / conditionings kept per loop


class Loop:
    """A set of live programs over one Denoiser; :meth:`step` advances all of them once.

    Counters: ``calls``, ``rows_run`` (padding included), ``seconds`` (in :meth:`step`) and
    ``model_seconds`` (in model calls). On a GPU the model time is host time unless
    ``sync_timing`` (a benchmark's switch: it synchronises around every call)."""

    sync_timing = False
    before_call = None  # callable(programs) run before each model call (a server's fault injection)

    def __init__(self, denoiser, *, batch_invariant: bool = False, bucket_rows: int = BUCKET_ROWS,
                 max_rows: int | None = None, progress: bool = False, desc: str | None = None):
        self.denoiser = denoiser
        self.batch_invariant, self.bucket_rows = batch_invariant, bucket_rows
        self.max_rows = bucket_rows if batch_invariant else max_rows
        self.live: list[Program] = []
        self.progress, self.desc = progress, desc  # the progress bar and its label
        self.calls = 0  # model calls made
        self.rows_run = 0  # rows run, padding included
        self.model_seconds = 0.0  # time inside model calls (the rest is the loop's own work)
        self.seconds = 0.0  # time in step()
        self._conds: OrderedDict = OrderedDict()
        self._plans: OrderedDict = OrderedDict()

    def add(self, program: Program) -> Program:
        """Join before the next step."""
        if program.denoiser.model_key != self.denoiser.model_key:
            raise ValueError("a program for another model cannot join this loop")
        if self.max_rows is not None and program.model_rows() > self.max_rows:
            what = "bucket_rows" if self.batch_invariant else "max_rows"
            raise ValueError(f"a program with {program.model_rows()} model rows does not fit {what}={self.max_rows}; "
                             f"raise {what}")
        if not program.done:
            self.live.append(program)
        return program

    def remove(self, program: Program) -> None:
        """Leave before the next step (a cancelled or timed-out request); its rows stop running."""
        self.live = [p for p in self.live if p is not program]
        self._forget()

    def _forget(self) -> None:
        """Drop memo entries made for programs that left: a server's loop outlives its requests,
        and an entry can hold a request's tuned weights (Imagic) or its plans."""
        live = {id(p) for p in self.live}
        for cache in (self._conds, self._plans):
            for key, (value, keep, owners, shared) in list(cache.items()):
                alive = owners & live
                if not (alive if shared else alive == owners):
                    del cache[key]
                elif shared:  # forget the ids of programs gone: a new program may reuse one
                    cache[key] = (value, keep, alive, shared)

    @property
    def rows(self) -> int:
        """Model rows of the live programs (what one step runs, before padding)."""
        return sum(p.model_rows() for p in self.live)

    def step(self, programs: list[Program] | None = None) -> None:
        """One step of every live program (or of ``programs``, a subset: a server retries the
        programs of a failed call on their own): one model call per group (or per bucket)."""
        tic = time.perf_counter()
        groups: dict = {}
        idle = []  # programs with no model rows this step (an optimisation stage's iteration)
        for p in self.live if programs is None else programs:
            inp = p.model_input()
            if inp is None:
                idle.append(p)
                continue
            x, t = inp
            groups.setdefault(p.group_key(x), []).append((p, x, t))
        try:
            for members in groups.values():
                for chunk in self._chunks(members):
                    self._call(chunk)
            for p in idle:
                p.advance(None)
        finally:  # a failed call leaves the programs of earlier calls advanced: drop the finished ones
            n = len(self.live)
            self.live = [p for p in self.live if not p.done]
            if len(self.live) < n:
                self._forget()
            self.seconds += time.perf_counter() - tic

    def run(self) -> None:
        total = max((p.steps_left for p in self.live), default=0)
        with tqdm(total=total, disable=not self.progress, desc=self.desc) as bar:
            while self.live:
                self.step()
                bar.update(1)

    # ---- one call ---------------------------------------------------------------------------
    def _chunks(self, members):
        if self.max_rows is None:
            return [members]
        chunks, cur, n = [], [], 0
        for m in members:
            r = m[1].shape[0]
            if cur and n + r > self.max_rows:
                chunks.append(cur)
                cur, n = [], 0
            cur.append(m)
            n += r
        return chunks + [cur]

    def _call(self, chunk) -> None:
        progs = [p for p, _, _ in chunk]
        x = torch.cat([x for _, x, _ in chunk])  # [R, C, h, w]
        t = torch.cat([t for _, _, t in chunk])  # [R]
        n = x.shape[0]
        total = self.bucket_rows if self.batch_invariant else n
        offsets, off = [], 0
        for p in progs:
            offsets.append(off)
            off += len(p.cond())
        conds = [p.cond() for p in progs]
        rows = self._memo(self._conds, tuple(id(c) for c in conds) + (total,),
                          lambda: self._rows(conds, total - n), keep=conds, owners=progs)
        plans = [p.plan() for p in progs]
        plan = self._memo(self._plans, tuple((id(q), o, len(c)) for q, o, c in zip(plans, offsets, conds)) + (total,),
                          lambda: merge([(q, o, len(p.cond())) for q, p, o in zip(plans, progs, offsets)], total,
                                        getattr(self.denoiser, "attn_layers", []), x.device), keep=plans,
                          owners=progs)
        if total > n:  # idle rows: zeros at the first row's timestep; nobody reads their output
            x = torch.cat([x, x.new_zeros(total - n, *x.shape[1:])])
            t = torch.cat([t, t[:1].expand(total - n)])
        if self.sync_timing and x.is_cuda:
            torch.cuda.synchronize(x.device)
        tic = time.perf_counter()
        sizes = tuple(len(p.cond()) for p in progs) + ((total - n,) if total > n else ())
        segments = "blocks" if self.batch_invariant else (sizes if len(sizes) > 1 else None)
        if self.before_call is not None:
            self.before_call(progs)
        out = self._denoiser(progs[0].denoiser, progs)(x, t, rows, plan, segments)  # [R, C, h, w]
        if hasattr(plan, "copy_back"):
            plan.copy_back()
        if self.sync_timing and x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.model_seconds += time.perf_counter() - tic
        self.calls += 1
        self.rows_run += total
        for p, o in zip(progs, offsets):
            p.advance(p.combine(out[o:o + len(p.cond())]))

    def _denoiser(self, den, progs):
        """The loop's denoiser (its runner: CUDA graphs), with the weights of the group's programs
        when they bring their own (a fine-tune kept apart from the model: Imagic)."""
        if den.key == self.denoiser.key:
            return self.denoiser
        return self._memo(self._conds, ("weights", den.key), lambda: self.denoiser.with_weights(den.weights), keep=den,
                          owners=progs, shared=True)

    @staticmethod
    def _rows(parts: list[RowCond], pad: int) -> RowCond:
        rows = parts[0] if len(parts) == 1 else RowCond.cat(parts)
        return rows.pad(pad) if pad else rows

    @staticmethod
    def _memo(cache: OrderedDict, key, make, keep, owners, shared: bool = False):
        """``make()`` once per key. The keyed objects stay alive (their ids stay theirs) while the
        programs they were made for live: all of them for a batch's rows and plan, any of them
        for a ``shared`` entry (one tuned model's weights serve every program that brings them)."""
        if key in cache:
            cache.move_to_end(key)
            value, keep_, had, shared = cache[key]
            if shared:  # another program bringing the same weights
                cache[key] = (value, keep_, had | frozenset(map(id, owners)), shared)
            return value
        value = make()
        cache[key] = (value, keep, frozenset(map(id, owners)), shared)
        if len(cache) > _CACHE:
            cache.popitem(last=False)
        return value


def run(programs: list[Program], denoiser, **loop_kw) -> list:
    """Run ``programs`` to the end through one :class:`Loop`; their results, in order."""
    loop = Loop(denoiser, **loop_kw)
    for p in programs:
        loop.add(p)
    loop.run()
    return [p.result() for p in programs]


class CallableDenoiser:
    """An opaque model function ``fn(x, t) -> output`` as a Denoiser (k-diffusion style),
    for samplers driven by any callable."""

    def __init__(self, fn):
        self.fn = fn
        self.key = self.model_key = ("callable", id(fn))

    def condition_rows(self, n: int, device) -> RowCond:
        return RowCond({"row": torch.arange(n, device=device)})

    def __call__(self, x, t, rows, plan=None, segments=None):
        return self.fn(x, t)


def sample(model_fn, x, sampler, *, generator=None, noise_fn=None, callback=None, progress: bool = True,
           start: int = 0, state=None):
    """Run ``sampler`` from step ``start`` to the end with an opaque ``model_fn(x_in, t)``,
    through the one loop (k-diffusion style).

    x_in = sampler.scale_model_input(x, i), t = sampler.timesteps[i] expanded to [B].
    Stochastic samplers draw noise at the steps and with the shape / dtype diffusers does
    (so the same generator gives the same images), or take it from ``noise_fn(i, output)``.
    ``callback`` gets dict(i, t, x, x0) after each step. x should already be scaled by
    ``sampler.init_noise_sigma``.
    """
    den = CallableDenoiser(model_fn)
    noise = drawn_noise(generator) if noise_fn is None else (lambda smp, i, pred: noise_fn(i, pred))
    prog = SamplerProgram(den, None, x, sampler, rows=den.condition_rows(x.shape[0], x.device), start=start,
                          noise=noise, state=state, callback=callback)
    return run([prog], den, progress=progress)[0]
