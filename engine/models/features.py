"""Feature injection: a row takes another row's intermediate features, as data in the plan.

Plug-and-Play (Tumanyan et al. 2023, Sec. 4) replaces the target's ResNet features in
the decoder with the source's; other methods read a transformer block's input the same
way. No module is hooked: every ResNet block and every transformer block is a
:class:`FeatureSite`, numbered when the model is built, and the code that runs it asks the
plan for the rows to read (an int tensor [R], ``rows[b]`` = the row whose features row b
takes), exactly as attention layers ask for their instructions. A plan without an entry
for a site leaves it alone; an identity entry gives bit-identical features (a gather).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class FeatureSite:
    """Identity of one place whose features can be replaced, fixed when the model is built."""

    index: int  # position among all sites, in module order
    name: str  # diffusers' module path, e.g. "up_blocks.1.resnets.1"
    kind: str  # "resnet" (its output) or "block" (a transformer block's input)
    place: str  # "down", "mid" or "up"


def inject_features(x: Tensor, site: FeatureSite | None, plan) -> Tensor:
    """x [R, ...] -> x with row b replaced by row ``rows[b]`` where the plan says so."""
    if plan is None or site is None:
        return x
    rows = plan.feature_rows(site)  # [R] int64 or None
    return x if rows is None else x.index_select(0, rows)


def number_feature_sites(model: nn.Module, kinds: dict[type, str]) -> list[FeatureSite]:
    """Give every module of a type in ``kinds`` ({ResnetBlock2D: "resnet", ...}) its site."""
    sites = []
    for name, mod in model.named_modules():
        kind = kinds.get(type(mod))
        if kind is not None:
            mod.site = FeatureSite(len(sites), name, kind, name.split(".")[0].split("_")[0])
            sites.append(mod.site)
    return sites


def site_named(sites: list[FeatureSite], name: str) -> FeatureSite:
    for s in sites:
        if s.name == name:
            return s
    resnets = [s.name for s in sites if s.kind == "resnet"]
    raise ValueError(f"no feature site {name!r} in this model; ResNet sites are {', '.join(resnets)}")
