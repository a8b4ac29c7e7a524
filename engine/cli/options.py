"""The CLI's parser: every option with help and its default, one description per command.

Method parameters are a table (:data:`EDIT_OPTIONS`): each row is a flag, the ``pipe.invert``
or ``pipe.edit`` parameter it sets and the methods it applies to, so the parser and the
parameters handed to the engine come from one place. Options left unset are not passed,
so the model's own recipes (its ``overpaint.json``) and then the method's defaults apply.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from engine.methods import DEFAULT_INVERSION as EDIT_METHODS  # edit method -> the inversion it edits
from engine.methods import IMAGE_EDITS, IMAGE_INVERSIONS

MODEL_HELP = "a diffusers pipeline folder, a hub id in the local cache, or a bundled model: 'shapes', 'shapes-v2', 'shapes-dit'"
SAMPLERS = ("ddim", "ddpm", "euler", "dpmpp_2m", "dpmpp_2m_sde")
LEDITS, P2P = ("ledits++",), ("p2p",)
FLOW = ("flow", "rf-inversion")  # FLUX models
INVERTED_GUIDED = ("p2p", "ddim", "ddpm", "pnp", "masactrl", "null-text") + FLOW  # inversions that take a guidance
GUIDED = INVERTED_GUIDED + ("pix2pix-zero", "imagic", "renoise")  # guided edits
PNP, MASACTRL, NULLTEXT, P2PZERO, IMAGIC = ("pnp",), ("masactrl",), ("null-text",), ("pix2pix-zero",), ("imagic",)
RF = ("rf-inversion",)
RENOISE = ("renoise",)
TIGHT_INV, TIGHT_EDIT = tuple(sorted(IMAGE_INVERSIONS)), tuple(sorted(IMAGE_EDITS))


def _number(kind, lo=None, positive=False, hi=None):
    """An argparse type: a finite int/float, optionally positive, at least ``lo``, at most ``hi``."""
    import math

    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {s!r}")
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
        if positive and v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {s}")
        if lo is not None and v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {s}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi}, got {s}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _fraction(s):
    v = _number(float)(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {s}")
    return v


def _chroma_key(s):
    """green | blue | R,G,B (0..255)."""
    if s.strip().lower() in ("green", "blue"):
        return s.strip().lower()
    parts = s.split(",")
    try:
        rgb = tuple(int(p) for p in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise argparse.ArgumentTypeError(f"expected green, blue or R,G,B with values in 0..255, got {s!r}")
    return rgb


def _weights(s):
    """W,W,...: one finite number in [-1, 1] per latent channel."""
    try:
        w = tuple(float(p) for p in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [-1, 1], got {s!r}") from None
    if not all(-1.0 <= v <= 1.0 for v in w):
        raise argparse.ArgumentTypeError(f"expected numbers in [-1, 1], got {s!r}")
    return w


def _pair(s):
    """X,Y: two finite numbers."""
    try:
        x, y = (float(p) for p in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y (two numbers), got {s!r}") from None
    if not all(map(math.isfinite, (x, y))):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {s!r}")
    return x, y


def _bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _word_weight(s):
    word, sep, weight = s.partition("=")
    if not sep or not word.strip():
        raise argparse.ArgumentTypeError(f"expected WORD=SCALE, e.g. red=2, got {s!r}")
    return word.strip(), _number(float)(weight)


positive_int, positive_float, finite = _number(int, positive=True), _number(float, positive=True), _number(float)
seed_type = _number(int)  # range handled by engine.params (reduced modulo 2**64 with a notice)


@dataclass
class Opt:
    """One method option: ``flags`` set parameter ``param`` of ``stage`` ("invert" or "edit")
    for ``methods``; ``per_concept``: a repeatable LEDITS++ value (once, or once per concept)."""

    flags: tuple[str, ...]
    param: str
    methods: tuple[str, ...]
    stage: str = "edit"
    per_concept: bool = False
    kw: dict = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")


EDIT_OPTIONS = [
    # Tight Inversion: the image itself conditions the inversion and the edit (IP-Adapter)
    Opt(("--image-scale",), "image_scale", TIGHT_INV, "invert",
        kw=dict(type=_number(float, lo=0), help="condition the inversion on the image through the IP-Adapter at this "
                                                "scale (Tight Inversion; --ip-adapter, or the model's own)")),
    Opt(("--edit-image-scale",), "image_scale", TIGHT_EDIT,
        kw=dict(type=_number(float, lo=0), help="the edit's image scale (default: the inversion's)")),
    # inversion
    Opt(("--source-guidance",), "guidance_scale", INVERTED_GUIDED + LEDITS, "invert",
        kw=dict(type=finite, help="classifier-free guidance of the inversion (default: the recipe's or method's)")),
    Opt(("--exact",), "exact", ("ddpm",), "invert",
        kw=dict(type=_bool, help="ddpm: the paper's one-at-a-time noise maps (true) or the batched "
                                 "equivalent (default false)")),
    Opt(("--skip",), "skip", ("ddpm", "ledits++"), "invert",  # p2p too when it inverts with ddpm
        kw=dict(type=_fraction, help="noise-map inversions: fraction of the noisiest steps skipped")),
    Opt(("--inversion-sampler",), "sampler", LEDITS, "invert",
        kw=dict(choices=("dpmpp_2m_sde", "ddim"), help="ledits++: the inversion's sampler (default dpmpp_2m_sde)")),
    # every guided edit
    Opt(("--guidance",), "guidance_scale", GUIDED,
        kw=dict(type=finite, help="classifier-free guidance of the edit (default: the recipe's, else the method's: "
                                  "the inversion's for ddim, ddpm and p2p, 7.5 for pnp, masactrl and imagic)")),
    Opt(("--negative-prompt",), "negative_prompt", GUIDED + LEDITS, kw=dict(help="negative prompt of the edit")),
    # LEDITS++
    Opt(("--edit-prompt",), "editing_prompt", LEDITS,
        kw=dict(action="append", help="ledits++: a concept to add, or to remove with --reverse (repeatable; "
                                      "default: --target-prompt)")),
    Opt(("--edit-scale",), "edit_guidance_scale", LEDITS, per_concept=True,
        kw=dict(action="append", type=finite, help="ledits++: guidance per concept (default 5)")),
    Opt(("--reverse",), "reverse_editing_direction", LEDITS, per_concept=True,
        kw=dict(action="append", type=_bool, nargs="?", const=True,
                help="ledits++: remove the concept instead of adding it (alone: true; or true/false per concept)")),
    Opt(("--edit-threshold",), "edit_threshold", LEDITS, per_concept=True,
        kw=dict(action="append", type=_fraction, help="ledits++: share of each concept's map left unmasked, "
                                                      "per concept (default 0.9)")),
    Opt(("--warmup",), "edit_warmup_steps", LEDITS, per_concept=True,
        kw=dict(action="append", type=_number(int, lo=0), help="ledits++: steps before a concept applies (default 0)")),
    Opt(("--cooldown",), "edit_cooldown_steps", LEDITS, per_concept=True,
        kw=dict(action="append", type=_number(int, lo=0), help="ledits++: step after which a concept stops "
                                                                "(default: never)")),
    Opt(("--intersect-mask",), "use_intersect_mask", LEDITS,
        kw=dict(action=argparse.BooleanOptionalAction, help="ledits++: mask = attention map AND guidance map "
                                                            "(default: on for SD, off for SDXL)")),
    Opt(("--cross-attn-mask",), "use_cross_attn_mask", LEDITS,
        kw=dict(action=argparse.BooleanOptionalAction, help="ledits++: mask from the attention maps alone")),
    Opt(("--mask",), "user_mask", LEDITS,
        kw=dict(metavar="IMAGE", help="ledits++: a grayscale image; the edit applies where it is white")),
    Opt(("--guidance-rescale",), "guidance_rescale", LEDITS,
        kw=dict(type=_fraction, help="ledits++: rescale the guided prediction's std (Lin et al. 2024)")),
    Opt(("--denoising-end",), "denoising_end", LEDITS,
        kw=dict(type=_fraction, help="ledits++ (SDXL): stop after this fraction of the steps")),
    # Prompt-to-Prompt
    Opt(("--invert-with",), "method", P2P, "invert",
        kw=dict(choices=("ddim", "ddpm", "null-text"),
                help="p2p: the inversion it edits (default: the recipe's, else ddim)")),
    Opt(("--cross-replace",), "cross_replace_steps", P2P,
        kw=dict(type=_fraction, help="p2p: fraction of steps whose cross-attention comes from the source "
                                     "(default 0.8)")),
    Opt(("--self-replace",), "self_replace_steps", P2P,
        kw=dict(type=_fraction, help="p2p: fraction of steps whose self-attention comes from the source "
                                     "(default 0.4)")),
    Opt(("--edit-type",), "edit_type", P2P,
        kw=dict(choices=("replace", "refine", "reweight"), help="p2p: word swap (same token count), refinement, "
                                                                 "or reweight only (default: from the prompts)")),
    Opt(("--reweight",), "equalizer", P2P,
        kw=dict(action="append", type=_word_weight, metavar="WORD=SCALE",
                help="p2p: scale the attention to a target word (repeatable), e.g. --reweight red=2")),
    Opt(("--blend-words",), "local_blend_words", P2P,
        kw=dict(nargs=2, metavar=("SOURCE_WORDS", "TARGET_WORDS"),
                help="p2p: local blending on these words, e.g. --blend-words 'red circle' 'blue circle'")),
    Opt(("--blend-threshold",), "blend_threshold", P2P,
        kw=dict(type=_fraction, help="p2p: local-blend mask threshold (default 0.3)")),
    Opt(("--blend-start",), "blend_start", P2P,
        kw=dict(type=_fraction, help="p2p: fraction of steps before blending starts (default 0.2)")),
    Opt(("--blend-resolution",), "blend_resolution", P2P,
        kw=dict(type=positive_int, help="p2p: side of the attention grid whose maps make the mask (default 16)")),
    Opt(("--blend-maps",), "blend_maps", P2P,
        kw=dict(choices=("own", "edited"), help="p2p: maps the mask sums: the edit rows' own or after replacement "
                                                "(default own)")),
    Opt(("--source-branch-guidance",), "source_guidance_scale", P2P,
        kw=dict(type=finite, help="p2p: guidance of the source branch during the edit (default: --guidance)")),
    Opt(("--source-branch",), "source", P2P,
        kw=dict(choices=("denoise", "inversion"), help="p2p: the source rows denoise the source prompt, or replay "
                                                       "the stored inversion (default: the recipe's, else denoise)")),
    Opt(("--self-replace-max-queries",), "self_replace_max_queries", P2P,
        kw=dict(type=positive_int, help="p2p: replace self-attention at layers with at most this many queries")),
    Opt(("--self-replace-min-scale",), "self_replace_min_scale", P2P,
        kw=dict(type=positive_int, help="p2p: or at layers downsampled at least this much")),
    # Plug-and-Play
    Opt(("--pnp-attn-t",), "pnp_attn_t", PNP,
        kw=dict(type=_fraction, help="pnp: fraction of steps whose decoder self-attention queries/keys come from "
                                     "the source (default 0.5)")),
    Opt(("--pnp-f-t",), "pnp_f_t", PNP,
        kw=dict(type=_fraction, help="pnp: fraction of steps whose ResNet features come from the source "
                                     "(default 0.8)")),
    Opt(("--feature-site",), "feature_site", PNP,
        kw=dict(metavar="MODULE", help="pnp: the ResNet whose output is injected (default: the reference's, "
                                       "e.g. up_blocks.1.resnets.1 on SD)")),
    # MasaCtrl
    Opt(("--start-step",), "start_step", MASACTRL,
        kw=dict(type=_number(int, lo=0), help="masactrl: first step with mutual self-attention (default 4)")),
    Opt(("--start-layer",), "start_layer", MASACTRL,
        kw=dict(type=_number(int, lo=0), help="masactrl: first self-attention layer, in forward order "
                                              "(default: 10 of SD's 16, 44 of SDXL's 70)")),
    Opt(("--mask-words",), "mask_words", MASACTRL,
        kw=dict(nargs=2, metavar=("SOURCE_WORDS", "TARGET_WORDS"),
                help="masactrl: the mask-guided variant, masks from these words' attention maps")),
    Opt(("--mask-threshold",), "mask_threshold", MASACTRL,
        kw=dict(type=_fraction, help="masactrl: mask threshold after min-max normalisation (default 0.1)")),
    Opt(("--end-step",), "end_step", MASACTRL,
        kw=dict(type=_number(int, lo=0), help="masactrl: the step mutual self-attention stops at (default: none)")),
    Opt(("--end-layer",), "end_layer", MASACTRL,
        kw=dict(type=_number(int, lo=0), help="masactrl: the self-attention layer it stops at (default: none)")),
    # null-text inversion (also under --method p2p --invert-with null-text)
    Opt(("--inner-steps",), "inner_steps", NULLTEXT, "invert",
        kw=dict(type=positive_int, help="null-text: Adam steps per timestep on the unconditional embedding "
                                        "(default 10)")),
    Opt(("--early-stop",), "early_stop", NULLTEXT, "invert",
        kw=dict(type=_number(float, lo=0), help="null-text: stop a step's optimisation under this loss "
                                                 "(+ 2e-5 per step; default 1e-5)")),
    Opt(("--null-text-lr",), "lr", NULLTEXT, "invert",
        kw=dict(type=_number(float, positive=True), help="null-text: Adam's learning rate, decayed by "
                                                          "1 - i/100 at step i (default 1e-2)")),
    # pix2pix-zero
    Opt(("--direction",), "direction", P2PZERO,
        kw=dict(nargs=2, metavar=("SOURCE_WORD", "TARGET_WORD"),
                help="pix2pix-zero: edit along word -> word, e.g. --direction cat dog (instead of --target-prompt)")),
    Opt(("--xa-guidance",), "cross_attention_guidance", P2PZERO,
        kw=dict(type=_number(float, lo=0), help="pix2pix-zero: cross-attention guidance step (default 0.1)")),
    Opt(("--lambda-ac",), "lambda_ac", P2PZERO + RENOISE, "invert",
        kw=dict(type=_number(float, lo=0), help="pix2pix-zero, renoise: auto-correlation regularisation of the "
                                                 "inversion (default 20)")),
    Opt(("--lambda-kl",), "lambda_kl", P2PZERO + RENOISE, "invert",
        kw=dict(type=_number(float, lo=0), help="pix2pix-zero: KL regularisation of the inversion (default 20); "
                                                 "renoise: patch KL to the forward-noised image's noise (0.065)")),
    Opt(("--renoise-steps",), "renoise_steps", RENOISE, "invert",
        kw=dict(type=_number(int, lo=0), help="renoise: renoising iterations per step (default 1; SDXL-Turbo 9)")),
    Opt(("--renoise-sampler",), "sampler", RENOISE, "invert",
        kw=dict(choices=("ddim", "euler_ancestral"), help="renoise: the sampler inverted (default: euler_ancestral "
                                                           "for models that sample with it, as SDXL-Turbo; else ddim)")),
    Opt(("--noise-correction",), "noise_correction", RENOISE, "invert",
        kw=dict(type=_bool, help="renoise, euler_ancestral: correct the stored noises (default true)")),
    # Imagic
    Opt(("--alpha",), "alpha", IMAGIC,
        kw=dict(type=finite, help="imagic: interpolation alpha·target + (1-alpha)·optimised embedding "
                                  "(default 1; the paper uses 1 to 2)")),
    Opt(("--embed-steps",), "embed_steps", IMAGIC, "invert",
        kw=dict(type=_number(int, lo=0), help="imagic: text-embedding optimisation steps (default 500)")),
    Opt(("--tune-steps",), "tune_steps", IMAGIC, "invert",
        kw=dict(type=_number(int, lo=0), help="imagic: UNet fine-tuning steps (default 1000)")),
    Opt(("--tune",), "tune", IMAGIC, "invert",
        kw=dict(choices=("full", "lora"), help="imagic: fine-tune every UNet weight or a LoRA of the attention "
                                                "projections (default full; never written to the model)")),
    Opt(("--tune-lr",), "tune_lr", IMAGIC, "invert",
        kw=dict(type=positive_float, help="imagic: fine-tuning learning rate (default 2e-6 full, 1e-4 lora)")),
    Opt(("--lora-rank",), "lora_rank", IMAGIC, "invert",
        kw=dict(type=positive_int, help="imagic: LoRA rank with --tune lora (default 4)")),
    # FLUX: flow inversion and RF-Inversion
    Opt(("--embedded-guidance",), "embedded_guidance", FLOW,
        kw=dict(type=finite, help="FLUX.1-dev: the edit's embedded guidance (default 3.5)")),
    Opt(("--source-embedded-guidance",), "embedded_guidance", FLOW, "invert",
        kw=dict(type=finite, help="FLUX.1-dev: the inversion's embedded guidance (default 0)")),
    Opt(("--gamma",), "gamma", RF, "invert",
        kw=dict(type=_fraction, help="rf-inversion: the inversion's pull toward a random noise (default 0.5; "
                                     "0: plain flow inversion)")),
    Opt(("--eta",), "eta", RF,
        kw=dict(type=_number(float, lo=0), help="rf-inversion: the edit's pull toward the image (default 0.9)")),
    Opt(("--start",), "start", RF,
        kw=dict(type=_fraction, help="rf-inversion: fraction of the steps before eta applies (default 0)")),
    Opt(("--stop",), "stop", RF,
        kw=dict(type=_fraction, help="rf-inversion: fraction of the steps after which eta stops (default 0.25)")),
    Opt(("--decay-eta",), "decay_eta", RF,
        kw=dict(action="store_const", const=True, help="rf-inversion: decay eta as (1 - i/steps)^power")),
]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: what is wrong and where the help is (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default where it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        shown = not (d is None or d is False or d is argparse.SUPPRESS or d == "" or d == [])
        if shown and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _common(debug_default):
    """-v and --debug, accepted before or after the command."""
    p = Parser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=debug_default,
                   help="log what the engine decides")
    p.add_argument("--debug", action="store_true", default=debug_default,
                   help="show the full traceback of an error")
    return p


def _runtime(p) -> None:
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="weights and compute dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--cuda-graphs", action="store_true", help="run the model calls as captured CUDA graphs")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _adapter_options(g) -> None:
    g.add_argument("--ip-adapter", default=None, metavar="FILE",
                   help="an IP-Adapter .safetensors (published layout; default: the model's own, if it ships one)")
    g.add_argument("--image-encoder", default=None, metavar="FOLDER",
                   help="its CLIPVisionModelWithProjection folder (default: image_encoder/ beside the adapter)")


def build_parser() -> argparse.ArgumentParser:
    from engine import __version__

    fmt = dict(formatter_class=HelpFormatter)
    sub_common = _common(argparse.SUPPRESS)
    p = Parser(prog="overpaint", description="Edit real images with diffusion models.",
                                parents=[_common(False)], **fmt)
    p.add_argument("--version", action="version", version=f"overpaint {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("tiny", parents=[sub_common], help="write a tiny random-weight pipeline (for tests)",
                       description="Write a tiny random-weight SD1.5-, SDXL- or FLUX.1-shaped pipeline in diffusers format.",
                       **fmt)
    t.add_argument("folder", help="a new (or empty) folder")
    t.add_argument("--arch", choices=("sd15", "sdxl", "flux-dev", "flux-schnell"), default="sd15", help="architecture")
    t.add_argument("--seed", type=seed_type, default=0, help="seed of the random weights")

    g = sub.add_parser("generate", parents=[sub_common], help="text to image", **fmt,
                       description="Generate images from a prompt.")
    g.add_argument("--model", default="shapes", help=MODEL_HELP)
    g.add_argument("--prompt", required=True, help="what to draw (shapes model: `overpaint vocab` lists its words)")
    g.add_argument("--negative-prompt", default=None, help="what to steer away from")
    g.add_argument("-o", "--output", required=True, help="output image (.png, .jpg, .webp, .bmp); with "
                                                         "--num-images N, NAME_0.png ... NAME_{N-1}.png")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    g.add_argument("--steps", type=positive_int, default=None,
                   help="denoising steps (default: the model card's, else the API's: 50 for SD, 28 for FLUX)")
    g.add_argument("--guidance", type=finite, default=None, help="classifier-free guidance scale (<= 1 disables it; "
                                                                 "default: the model's, 7.5 for SD)")
    g.add_argument("--embedded-guidance", type=finite, default=None,
                   help="FLUX.1-dev: the distilled guidance value (default 3.5)")
    g.add_argument("--guidance-rescale", type=_fraction, default=None, help="guidance rescale (Lin et al. 2024)")
    g.add_argument("--seed", type=seed_type, default=0, help="random seed (any integer)")
    g.add_argument("--height", type=positive_int, default=None, help="image height (default: the model's size)")
    g.add_argument("--width", type=positive_int, default=None, help="image width (default: the model's size)")
    g.add_argument("--num-images", type=positive_int, default=1, help="images to generate")
    g.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the checkpoint's scheduler")
    c = g.add_argument_group("ControlNet")
    c.add_argument("--controlnet", default=None, help="a diffusers ControlNet folder (config.json + safetensors)")
    c.add_argument("--control-image", default=None, help="the conditioning image (edges, depth, pose, ...)")
    c.add_argument("--control-scale", type=_number(float, lo=0.0), default=1.0, help="conditioning scale (default 1)")
    ip = g.add_argument_group("IP-Adapter: an image prompt")
    ip.add_argument("--ip-image", default=None, help="the image prompt (needs --ip-adapter, or the model's own)")
    ip.add_argument("--ip-scale", type=_number(float, lo=0.0), default=1.0, help="image prompt scale (default 1)")
    _adapter_options(ip)
    k = g.add_argument_group("chroma key (TKG-DM): objects on a key-coloured background")
    k.add_argument("--chroma-key", type=_chroma_key, default=None, help="green, blue or R,G,B")
    k.add_argument("--alpha", action="store_true", help="write RGBA with the key background transparent "
                                                        "(needs --chroma-key and a .png or .webp output)")
    k.add_argument("--chroma-shift", type=_fraction, default=0.11,
                   help="rise of the shifted channels' share of key-signed values (paper: 0.11)")
    k.add_argument("--chroma-std", type=_number(float, positive=True), default=0.5,
                   help="std of the Gaussian object region on [-1, 1] coordinates (paper: 0.5)")
    k.add_argument("--chroma-center", type=_pair, default=(0.0, 0.0), metavar="X,Y",
                   help="centre of the object region on [-1, 1] coordinates (default 0,0; a negative X: "
                        "--chroma-center=-0.5,0)")
    k.add_argument("--chroma-direction", type=_weights, default=None, metavar="W,W,...",
                   help="the latent shift's weight per channel, in [-1, 1], instead of the one measured for the "
                        "key on the model's VAE (e.g. --chroma-direction=-1,1,0,1)")
    _runtime(g)

    e = sub.add_parser("edit", parents=[sub_common], help="edit a real image with a sentence", **fmt,
                       description="Invert an image into the model's noise space and regenerate it under an edit.\n"
                                   "Unset options come from the model's recipes (its overpaint.json), then the "
                                   "method's defaults.")
    e.add_argument("image", help="the image to edit (.png, .jpg, ...); never modified")
    e.add_argument("--model", default="shapes", help=MODEL_HELP)
    e.add_argument("--method", choices=tuple(EDIT_METHODS), default="p2p", help="editing method")
    e.add_argument("--source-prompt", default="", help="a caption of the input image")
    e.add_argument("--target-prompt", default=None,
                   help="the caption of the edited image (ledits++: used as the concept when no --edit-prompt)")
    e.add_argument("-o", "--output", required=True, help="output image (.png, .jpg, .webp, .bmp)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output file (default: refuse)")
    e.add_argument("--steps", type=positive_int, default=None, help="inversion steps (default: the recipe's or "
                                                                     "the method's: 50, ledits++ 30)")
    e.add_argument("--seed", type=seed_type, default=0, help="seed of the noise maps (ddpm, ledits++)")
    e.add_argument("--inversion", default=None, metavar="FILE",
                   help="load the inversion from FILE if it exists, else save it there (.safetensors)")
    size = e.add_argument_group("image size")
    size.add_argument("--keep-size", action="store_true",
                      help="process the image at its own size (default: resize one far from the model's size to it)")
    size.add_argument("--height", type=positive_int, default=None,
                      help="resize the image to this height first (alone: the width keeps the aspect)")
    size.add_argument("--width", type=positive_int, default=None,
                      help="resize the image to this width first (alone: the height keeps the aspect)")
    size.add_argument("--output-size", choices=("model", "input"), default="model",
                      help="write the result at the size it was processed at, or resized back to the input's")
    size.add_argument("--background", default="white",
                      help="colour transparent pixels are composited over: white, black, gray or #rrggbb")
    groups = {"invert": e.add_argument_group("inversion"), "ledits++": e.add_argument_group("LEDITS++ options"),
              "p2p": e.add_argument_group("Prompt-to-Prompt options"), "pnp": e.add_argument_group("Plug-and-Play options"),
              "masactrl": e.add_argument_group("MasaCtrl options"),
              "pix2pix-zero": e.add_argument_group("pix2pix-zero options"), "imagic": e.add_argument_group("Imagic options"),
              "rf-inversion": e.add_argument_group("RF-Inversion options (FLUX)"),
              "edit": e.add_argument_group("edit")}
    for o in EDIT_OPTIONS:
        grp = groups["invert" if o.stage == "invert" and o.methods != P2P else
                     o.methods[0] if len(o.methods) == 1 and o.methods[0] in groups else "edit"]
        grp.add_argument(*o.flags, dest=o.dest, default=None, **o.kw)
    _adapter_options(groups["invert"])
    _runtime(e)

    d = sub.add_parser("demo", parents=[sub_common], help="edit a bundled example scene", **fmt,
                       description="Render a bundled Shapes scene (a red circle), invert it and edit it to a blue "
                                   "circle; writes input.png, reconstruction.png, edited.png and side_by_side.png.")
    d.add_argument("-o", "--output", required=True, help="output folder (created if missing; files in it with "
                                                         "those four names are replaced)")
    d.add_argument("--model", default="shapes", help="a Shapes-world model folder (default: the bundled one)")

    v = sub.add_parser("vocab", parents=[sub_common], help="list the words a model was trained on", **fmt,
                       description="Print the vocabulary a model declares (the bundled shapes model does); prompts "
                                   "with other words get a warning.")
    v.add_argument("--model", default="shapes", help=MODEL_HELP)

    s = sub.add_parser("serve", parents=[sub_common], help="serve edits over HTTP (OpenAI-compatible routes, a web page)",
                       description="Serve edits over HTTP with step-level continuous batching: OpenAI-compatible "
                                   "/v1/images/edits and /v1/images/generations, native jobs with server-sent events, "
                                   "an inversion cache, /metrics, and a web page at /.", **fmt)
    s.add_argument("--model", default="shapes", help=MODEL_HELP)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback needs --api-key)")
    s.add_argument("--port", type=_number(int, lo=0, hi=65535), default=8000, help="port (0: any free one)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (also from OVERPAINT_API_KEY)")
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    s.add_argument("--max-batch-rows", type=positive_int, default=64, help="cap on model rows per step")
    s.add_argument("--max-queue", type=positive_int, default=256, help="jobs waiting beyond this get 429")
    s.add_argument("--max-body-bytes", type=positive_int, default=32 << 20, help="larger request bodies get 413")
    s.add_argument("--timeout", type=positive_float, default=600.0, help="seconds before a request ends with 408")
    s.add_argument("--cache-bytes", type=positive_int, default=2 << 30, help="inversion cache size in memory")
    s.add_argument("--cache-dir", default=None, help="also keep cached inversions in this folder (safetensors)")
    s.add_argument("--ip-adapter", default=None, metavar="FILE|own",
                   help="an IP-Adapter for image_scale (Tight Inversion) requests: its .safetensors, or 'own' for "
                        "the model's (the bundled Shapes model ships one)")
    s.add_argument("--image-encoder", default=None, metavar="FOLDER", help="its image encoder folder")
    s.add_argument("--batch-invariant", action="store_true",
                   help="fixed-size batches: each result bit-identical to the request served alone")
    s.add_argument("--grace", type=positive_float, default=30.0, help="seconds to finish jobs after SIGTERM")
    s.add_argument("--ray", action="store_true", help="serve through Ray Serve (pip install 'overpaint[ray]')")
    s.add_argument("--replicas", type=positive_int, default=1, help="with --ray: replicas (one per GPU)")
    _runtime(s)

    # Listed for --help only: main() hands everything after "bench" to the benchmark's own parser.
    sub.add_parser("bench", help="benchmarks: overpaint bench [e2e|edit|step] [--device cpu --tiny ...] (e2e and edit: "
                                 "vs diffusers; step: edit_many batching vs one at a time)", add_help=False)
    return p
