"""Shared pieces of the end-to-end benchmarks (`e2e.py`, `edit.py`): random-weight models of
the real architectures, device facts, timing, FLOP counting, JSON and plot output.

Models are diffusers' own modules built from the published configs (written inline: no
download), randomly initialised directly on the target device; ours load diffusers' state
dict with ``assign=True``, so both sides run literally the same weight tensors (one copy
in memory) and the same VAE and text encoders. ``tiny=True`` swaps in `engine.tiny`'s
miniature configs for the CPU smoke test.
"""

from __future__ import annotations

import datetime
import json
import sys
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)

# ---- architectures (diffusers' published configs: runwayml SD1.5, stabilityai SDXL base / Turbo)
SD15_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                 attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
ARCHS = {  # arch -> (unet config, text encoders, vae scaling factor, scheduler class, scheduler options)
    "sd15": (SD15_UNET, (CLIP_L,), 0.18215, "DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
    "sdxl": (SDXL_UNET, (CLIP_L, CLIP_BIGG), 0.13025, "EulerDiscreteScheduler", dict(timestep_spacing="leading")),
    # Turbo ships Euler ancestral with trailing spacing (ReNoise's Turbo path inverts it).
    "sdxl-turbo": ({**SDXL_UNET, "sample_size": 64}, (CLIP_L, CLIP_BIGG), 0.13025, "EulerAncestralDiscreteScheduler",
                   dict(timestep_spacing="trailing")),
}


@dataclass
class Models:
    """One architecture, twice: ``ours`` (an engine Pipeline) and ``theirs`` (a diffusers
    pipeline) over the same weight, VAE and text-encoder tensors."""

    arch: str
    ours: object
    theirs: object
    dtype: torch.dtype
    info: dict = field(default_factory=dict)


def build(arch: str, device: str, dtype: torch.dtype, tiny: bool = False, seed: int = 0) -> Models:
    """Random-weight models of ``arch`` ("sd15", "sdxl", "sdxl-turbo") on ``device``."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                           StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engine import tiny as tiny_mod

    xl = arch != "sd15"
    unet_cfg, encoders, scaling, sched_name, sched_kw = ARCHS[arch]
    torch.manual_seed(seed)
    text = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    with torch.device(device):  # random init directly on the device: seconds, not minutes, for SDXL
        if tiny:
            unet = UNet2DConditionModel(**(tiny_mod.sdxl_unet_config() if xl else tiny_mod.sd15_unet_config()))
            tes = [CLIPTextModel(tiny_mod._text_config(32, 32))]
            if xl:
                tes.append(CLIPTextModelWithProjection(tiny_mod._text_config(32, 32)))
            vae = tiny_mod._vae()
        else:
            unet = UNet2DConditionModel(**unet_cfg)
            tes = [CLIPTextModel(CLIPTextConfig(**text, **encoders[0]))]
            if xl:
                tes.append(CLIPTextModelWithProjection(CLIPTextConfig(**text, **encoders[1])))
            vae = AutoencoderKL(**VAE, scaling_factor=scaling, sample_size=1024 if xl else 512,
                                force_upcast=xl)
    with torch.no_grad():
        for p in unet.parameters():  # diffusers zero-initialises a few layers: make every weight count
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    # SDXL's VAE overflows in fp16: fp32 as the loader (and diffusers' force_upcast) would run it
    vae_dtype = torch.float32 if xl and dtype == torch.float16 else dtype
    # nn.Module.to: a plain cast, without diffusers' warning about fp32-kept modules (it keeps none)
    unet, vae = torch.nn.Module.to(unet, dtype).eval(), torch.nn.Module.to(vae, vae_dtype).eval()
    tes = [t.to(dtype).eval() for t in tes]
    tok = _tokenizer()
    sched_cls = {"DDIMScheduler": DDIMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler,
                 "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler}[sched_name]
    sched = sched_cls(**SCHED, **sched_kw)
    if xl:
        theirs = StableDiffusionXLPipeline(vae=vae, text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=tok,
                                           tokenizer_2=tok, unet=unet, scheduler=sched)
    else:
        theirs = StableDiffusionPipeline(vae=vae, text_encoder=tes[0], tokenizer=tok, unet=unet, scheduler=sched,
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    ours = _ours(unet, vae, tes, tok, sched, xl, device, dtype, vae_dtype)
    params = sum(p.numel() for p in unet.parameters())
    return Models(arch, ours, theirs, dtype, dict(unet_params=params, tiny=tiny, vae_dtype=str(vae_dtype)))


def _tokenizer():
    import tempfile

    from transformers import CLIPTokenizer

    from engine.tiny import write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:  # byte-level CLIP vocabulary: no download
        write_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp)


def _ours(unet, vae, tes, tok, sched, xl, device, dtype, vae_dtype):
    """An engine Pipeline over the same modules; our UNet takes diffusers' tensors as they are."""
    import engine
    from engine.loader import Components
    from engine.loading.modules import load_module
    from engine.models.config import UNetConfig
    from engine.models.unet import UNet2DConditionModel as OurUNet

    cfg = UNetConfig.from_dict({k: v for k, v in dict(unet.config).items()})
    ours = load_module("unet", lambda: OurUNet(cfg), unet.state_dict(), torch.device(device), dtype)
    sched_cfg = {**dict(sched.config), "_class_name": type(sched).__name__}
    comps = Components(root=Path("."), model_index={"force_zeros_for_empty_prompt": True}, unet=ours, vae=vae,
                       text_encoder=tes[0], text_encoder_2=tes[1] if xl else None, tokenizer=tok,
                       tokenizer_2=tok if xl else None, scheduler_config=sched_cfg, arch="sdxl" if xl else "sd",
                       vae_dtype=vae_dtype)
    return engine.Pipeline(comps)


def source_image(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth random RGB image [1, 3, size, size] in [0, 1] (something to invert)."""
    low = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


# ---- device facts -----------------------------------------------------------------------------


def device_name(device: str) -> str:
    """The GPU's name, or "cpu <model name>" (every benchmark JSON names its device)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"cpu {platform.processor() or platform.machine()}"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, tiny: bool = False) -> dict:
    """Measured dense matmul throughput (bf16 on CUDA, float32 on CPU): the MFU denominator."""
    cuda = device.startswith("cuda")
    n, dtype, reps = (8192, torch.bfloat16, 20) if cuda else ((256, torch.float32, 3) if tiny else (2048, torch.float32, 5))
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return dict(tflops=2 * n**3 / min(times) / 1e12, n=n, dtype=str(dtype).removeprefix("torch."))


def versions() -> dict:
    import diffusers
    import transformers

    out = dict(torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
               python=platform.python_version(), cuda=torch.version.cuda)
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def uncommitted() -> list[str]:
    """Code and bundled models that differ from ``git_commit`` when the figures were taken
    (changed or untracked files under engine/, kernels/ and benchmarks/, results excepted):
    empty when the commit alone reproduces them."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=all", "--", "engine", "kernels",
                              "benchmarks", ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    except Exception:
        return ["unknown"]
    entries, paths = iter(out.split("\0")), []
    for e in entries:  # "XY path"; a rename or copy is followed by its old path, which is skipped
        if e:
            paths.append(e[3:])
            if "R" in e[:2] or "C" in e[:2]:
                next(entries, None)
    return paths


# ---- measuring --------------------------------------------------------------------------------


def wall(fn, device: str) -> float:
    """Seconds of one synchronised call."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(fn, m: Models, impl: str, device: str, repeats: int, warmup: int, count: bool = True) -> dict:
    """Time ``fn`` (one whole workload run): ``warmup`` untimed runs, the last of them
    instrumented (UNet calls and rows, VAE seconds; host-side counters, two syncs around
    each VAE call), then ``repeats`` timed runs: their median, and their peak memory."""
    cuda = device.startswith("cuda")
    unet = denoiser_module(m.ours if impl.startswith("ours") else m.theirs)
    first = None
    for _ in range(max(warmup - 1, 0)):
        first = wall(fn, device) if first is None else first
    counter = RowCounter(unet) if count else None
    vae = m.ours.vae  # shared by both sides
    vae_s = [0.0]
    vae_rows = {"encode": 0, "decode": 0}
    originals = {name: getattr(vae, name) for name in ("encode", "decode")}

    def timed_call(f):
        def call(*a, **kw):
            vae_rows[f.__name__] += int(a[0].shape[0]) if a else 0
            sync(device)
            t0 = time.perf_counter()
            out = f(*a, **kw)
            sync(device)
            vae_s[0] += time.perf_counter() - t0
            return out
        return call

    for name, f in originals.items():
        setattr(vae, name, timed_call(f))
    try:
        t = wall(fn, device)
    finally:
        for name in originals:
            delattr(vae, name)  # back to the class's bound methods
        if counter is not None:
            counter.close()
    first = t if first is None else first
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    # warmup 0 (smoke tests): the instrumented run is also the first timed one
    times = ([t] if warmup == 0 else []) + [wall(fn, device) for _ in range(repeats - (warmup == 0))]
    peak = torch.cuda.max_memory_allocated() if cuda else None
    med = statistics.median(times)
    return dict(median_s=med, min_s=min(times), times_s=times, first_call_s=first,
                peak_mem_gb=None if peak is None else peak / 2**30,
                peak_over_resident_gb=None if peak is None else (peak - base) / 2**30,
                unet_calls=counter.calls if counter else None, unet_rows=counter.rows if counter else None,
                evals_per_s=counter.rows / med if counter else None,
                vae_s=vae_s[0], vae_share=min(vae_s[0] / t, 1.0), vae_encode_rows=vae_rows["encode"],
                vae_decode_rows=vae_rows["decode"])


def denoiser_module(pipe):
    """The module evaluated per step: a UNet, or a FLUX transformer."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


class RowCounter:
    """Counts model calls and rows (model evaluations) through a forward pre-hook: host ints, no syncs."""

    def __init__(self, module):
        self.calls = self.rows = 0
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls += 1
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))  # diffusers passes keywords
        self.rows += int(x.shape[0]) if x is not None else 0

    def close(self):
        self.handle.remove()


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn`` (torch's FLOP counter: matmuls, convolutions, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---- output -----------------------------------------------------------------------------------


def meta(device: str, settings: dict) -> dict:
    cap = ".".join(map(str, torch.cuda.get_device_capability())) if device.startswith("cuda") else None
    return dict(device=device_name(device), capability=cap,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=git_commit(), uncommitted=uncommitted(), versions=versions(), settings=settings)


def plot_or_warn(plot, *args) -> None:
    """Run a matplotlib figure function; without matplotlib, say so and go on (it is optional)."""
    try:
        plot(*args)
    except ImportError:
        print("matplotlib is not installed: no figure", file=sys.stderr)


def write_json(path: Path, meta_: dict, results: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta=meta_, results=results), indent=1, default=str))
    return path


def write_svg(path: Path, results: list[dict], title: str) -> Path:
    """Horizontal bars of median latency per (workload, implementation), in plain SVG
    (no plotting dependency)."""
    rows = [r for r in results if r.get("median_s")]
    width, bar, left = 760, 18, 300
    height = 40 + len(rows) * (bar + 6)
    top = max((r["median_s"] for r in rows), default=1.0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><text x="10" y="20" font-size="14">{title}</text>']
    for k, r in enumerate(rows):
        y = 32 + k * (bar + 6)
        w = (width - left - 90) * r["median_s"] / top
        color = "#d62728" if r["impl"].startswith("ours") else "#1f77b4"
        parts.append(f'<text x="10" y="{y + 13}">{r["workload"]} · {r["impl"]}</text>'
                     f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar}" fill="{color}"/>'
                     f'<text x="{left + w + 5:.1f}" y="{y + 13}">{r["median_s"] * 1e3:.1f} ms</text>')
    parts.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def print_table(results: list[dict]) -> None:
    print(f"{'workload':<24} {'impl':<22} {'median ms':>10} {'peak GB':>8} {'evals/s':>8} {'MFU':>6} {'VAE %':>6}")
    for r in results:
        if r.get("error"):
            print(f"{r['workload']:<24} {r['impl']:<22} {'error':>10}  {r['error'][:70]}")
            continue
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        print(f"{r['workload']:<24} {r['impl']:<22} {r['median_s'] * 1e3:>10.1f} {f(r.get('peak_mem_gb'), '8.2f'):>8} "
              f"{f(r.get('evals_per_s'), '8.1f'):>8} {f(r.get('mfu'), '6.1%'):>6} {f(r.get('vae_share'), '6.1%'):>6}")
