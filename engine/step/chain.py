"""Programs in sequence: one program whose stages run one after another on the one loop.

Some methods are two passes over the steps: null-text inversion (a DDIM inversion, then a
pass that optimises the unconditional embedding along its trajectory). Each pass is an
ordinary program; :class:`Chain` runs the first, builds the next from
its result, and so on, so the whole method is one program that shares model calls with
any others and reports one progress total.
"""

from __future__ import annotations

from typing import Callable

from .program import Program


class Chain(Program):
    """``first``, then ``stages[0](first.result())``, then ``stages[1](that.result())``, ...

    stages: (build, steps) pairs -- ``build(previous_result) -> Program`` and the number of
    steps it will run (for the progress total). The chain's result is the last stage's."""

    def __init__(self, first: Program, stages: list[tuple[Callable, int]]):
        self.current, self.stages = first, list(stages)
        self._next_stage()

    def _next_stage(self) -> None:
        """While the current stage is done and another follows: build it (a stage with no steps
        finishes at once)."""
        while self.current.done and self.stages:
            build, _ = self.stages.pop(0)
            self.current = build(self.current.result())

    # The protocol, delegated to the current stage.
    @property
    def denoiser(self):
        return self.current.denoiser

    @property
    def matte(self):
        return self.current.matte

    def cond(self):
        return self.current.cond()

    def model_input(self):
        return self.current.model_input()

    def model_rows(self):
        return self.current.model_rows()

    def plan(self):
        return self.current.plan()

    def combine(self, out):
        return self.current.combine(out)

    def advance(self, pred) -> None:
        self.current.advance(pred)
        self._next_stage()

    @property
    def done(self) -> bool:
        return self.current.done and not self.stages

    @property
    def steps_left(self) -> int:
        return self.current.steps_left + sum(n for _, n in self.stages)

    def result(self):
        return self.current.result()

    def group_key(self, x):
        return self.current.group_key(x)
