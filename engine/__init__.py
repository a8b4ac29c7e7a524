"""overpaint: a kernel-optimized inference engine for editing real images with diffusion models.

    import engine
    pipe = engine.load("path/to/diffusers-pipeline", device="cuda", dtype="fp16")
    image = pipe.generate("a red circle on a white background", steps=30, seed=0)[0]
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "Pipeline", "AttentionPlan", "__version__"]


def load(path_or_id, device="cpu", dtype="fp32", variant=None):
    """Load a diffusers-format pipeline (a local folder or a hub id already in the local
    Hugging Face cache; never the network) and return a :class:`Pipeline` (SD, SDXL) or a
    :class:`~engine.flux.FluxPipeline` (FLUX.1, the bundled "shapes-dit")."""
    from .loader import load_components

    c = load_components(path_or_id, device=device, dtype=dtype, variant=variant)
    if c.arch == "flux":
        from .flux import FluxPipeline

        return FluxPipeline(c)
    from .pipeline import Pipeline

    return Pipeline(c)


def __getattr__(name):
    # Lazy so that `import engine` stays cheap (the CLI imports torch only when it runs).
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "AttentionPlan":
        from .models.attention import AttentionPlan

        return AttentionPlan
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
