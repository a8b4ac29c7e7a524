"""Execution runtime around the models: CUDA graphs (`graphs`, `trees`; the Denoiser in `engine.step` runs its model call through them), and compiled /
channels-last execution (`fuse`). Nothing here changes results: every path has an eager
twin that the tests compare it with."""

from .graphs import GraphRunner, capture_blocker, is_oom, log_once

__all__ = ["GraphRunner", "capture_blocker", "is_oom", "log_once"]
