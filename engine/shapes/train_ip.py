"""Train an IP-Adapter ("plus") for a Shapes UNet model (the bundled one by default), with its image encoder, and save both in
h94/IP-Adapter's layout, so Tight Inversion (image-conditioned inversion) is measurable offline.

    python -m engine.shapes.train_ip --out /tmp/ip-run --export engine/shapes/model/ip_adapter   # the shipped one
    python -m engine.shapes.train_ip --out /tmp/ip --smoke                                 # seconds
    python -m engine.shapes.train_ip --model /tmp/shapes/export --out /tmp/ip-run          # another Shapes model

The scenes' share on green or blue screens follows the model's own training (its
``train_config.json``'s ``screens``) unless ``--screens`` says otherwise. Exported into the
model's own ``ip_adapter/`` folder, the adapter is named in the model's card (``overpaint.json``),
so ``pipe.load_ip_adapter()`` finds it.

The Shapes pipeline (UNet, VAE, text encoder) stays frozen, loaded through ``engine.load(--model)``:
the adapter is trained on our own executor, its image tokens entering every cross-attention
layer through the attention seam (:meth:`engine.models.ip_adapter.IPAdapter.plan`), the same
path inference takes. Trained: a small CLIP vision tower (no pretrained encoder knows this world;
its penultimate hidden states feed the Resampler), the Resampler, and each cross-attention
layer's ``to_k_ip`` / ``to_v_ip``, initialised from the layer's ``to_k`` / ``to_v`` (Ye et al.
2023, Sec. 3.2). The loss is the UNet's own (v-prediction, Min-SNR-5; :mod:`engine.shapes.train`).
As the paper: 5% of captions dropped, 5% of images (an all-zero encoder input, which is what the
null image encodes at inference), 5% both. AdamW, warm-up and cosine decay, EMA, fp32.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.shapes.train import (EMA, Logger, _after_step, _bar, _generator, _lr, _save_checkpoint, _start, _update,
                                 RunSettings, explicit_flags, scene_batch, snr_weight, timesteps, trainer_args)

from engine.shapes.recipes import IP_ADAPTER

IP_STAGE = 7  # scene_batch's data stream id: distinct from the UNet's and the DiT's
EXPORT = Path(__file__).parent / "model" / Path(IP_ADAPTER).parent  # where the shipped adapter lives
ADAPTER_FILE = Path(IP_ADAPTER).name


@dataclass
class IPTrainConfig(RunSettings):
    model: str = "shapes"  # the Shapes pipeline the adapter is for (a name or a folder)
    screens: float | None = None  # share of scenes on screens; None: as the model was trained
    seed: int = 0
    steps: int = 2500
    batch_size: int = 16
    lr: float = 5e-4
    warmup: int = 100
    drop: float = 0.05  # each of: text dropped, image dropped, both dropped
    partial_captions: float = 0.2
    tokens: int = 16
    encoder_width: int = 128
    encoder_layers: int = 4
    resampler_depth: int = 4  # diffusers' converter builds 4-deep Resamplers


def build(cfg: IPTrainConfig, pipe):
    """(image encoder, adapter) for the Shapes UNet, the adapter's K/V projections copied from the UNet's."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from engine.models.ip_adapter import IPAdapter, Resampler, context_dim, cross_layers

    w = cfg.encoder_width
    enc_cfg = CLIPVisionConfig(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=cfg.encoder_layers,
                               num_attention_heads=max(1, w // 32), image_size=64, patch_size=8, projection_dim=w)
    encoder = CLIPVisionModelWithProjection(enc_cfg)
    dim = context_dim(pipe.unet)
    resampler = Resampler(w, w, dim, cfg.tokens, cfg.resampler_depth, max(1, w // 64))
    adapter = IPAdapter(resampler, cross_layers(pipe.unet), dim, "plus")
    mods = {m.layer.index: m for m in pipe.unet.modules() if getattr(m, "layer", None) is not None}
    with torch.no_grad():
        for j, idx in enumerate(adapter.layers):
            adapter.to_k_ip[j].weight.copy_(mods[idx].to_k.weight)
            adapter.to_v_ip[j].weight.copy_(mods[idx].to_v.weight)
    return encoder, adapter


def model_screens(model: str) -> float:
    """The share of screen scenes the Shapes model ``model`` was trained on (0 if it does not say)."""
    from engine.loader import resolve

    path = resolve(model) / "train_config.json"
    return float(json.loads(path.read_text()).get("screens", 0.0)) if path.exists() else 0.0


def train(cfg: IPTrainConfig, pipe, encoder, adapter, opt, ema, start: int, deadline: float, t0: float, logger,
          checkpoint) -> int:
    from engine.image_prompt import ImageEncoder
    from engine.shapes.model import scheduler

    pre = ImageEncoder(encoder)  # CLIP normalisation at the encoder's 64x64
    abar = scheduler("v_prediction").alphas_cumprod.to(cfg.device)  # [1000]
    params = [p for m in (encoder, adapter) for p in m.parameters()]
    encoder.train(), adapter.train()
    step, bar = start, _bar(cfg, start, cfg.steps, "ip-adapter")
    while step < cfg.steps and time.time() < deadline:
        x, caps = scene_batch(cfg.seed, IP_STAGE, step, cfg.batch_size, partial=cfg.partial_captions,
                              screens=cfg.screens)
        g = _generator(cfg.seed, IP_STAGE, step)
        r = torch.rand(len(caps), generator=g)  # [B]
        no_text = (r < cfg.drop) | ((r >= 2 * cfg.drop) & (r < 3 * cfg.drop))
        no_image = (r >= cfg.drop) & (r < 3 * cfg.drop)
        caps = ["" if d else c for c, d in zip(caps, no_text.tolist())]
        for group in opt.param_groups:
            group["lr"] = _lr(cfg.lr, step, cfg.warmup, cfg.steps)
        images = (x + 1) / 2  # [B, 3, 64, 64] in [0, 1]
        with torch.no_grad():
            z0 = pipe.encode_image(images).float()  # [B, 4, 16, 16]
            ctx = pipe.encode_prompt(caps, guidance=False)[0].context  # [B, 77, D]
        t = timesteps(len(caps), len(abar), 0.0, g).to(cfg.device)  # [B]
        eps = torch.randn(z0.shape, generator=g).to(z0)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        target = a.sqrt() * eps - (1 - a).sqrt() * z0  # v
        pixels = pre.preprocess(images).to(cfg.device) * (~no_image).view(-1, 1, 1, 1)  # null image: zero input
        states = encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # [B, 65, W]
        plan = adapter.plan(adapter.project(states), torch.ones(len(caps), device=cfg.device))
        pred = pipe.unet(zt, t, ctx, plan=plan)  # [B, 4, 16, 16]
        loss = (snr_weight(a.view(-1), "v_prediction", 5.0) * (pred.float() - target).pow(2).mean((1, 2, 3))).mean()
        _update(opt, loss, params)
        if ema is not None:
            ema.update([encoder, adapter], step)
        step += 1
        _after_step(cfg, "ip", step, cfg.steps, loss.item(), opt.param_groups[0]["lr"], bar, logger, t0, checkpoint)
    bar.close()
    return step


def export(folder: Path, pipe, encoder, adapter, out: Path | None = None, model: Path | None = None) -> Path:
    """Write the adapter file and ``image_encoder/`` (config, weights, preprocessing) into ``folder``;
    when ``folder`` is the ``ip_adapter/`` of ``model`` (the pipeline folder it was trained for),
    name it in that model's card."""
    from safetensors.torch import save_file

    from engine.models.ip_adapter import to_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    encoder.eval().save_pretrained(folder / "image_encoder", safe_serialization=True)
    n = encoder.config.image_size
    (folder / "image_encoder" / "preprocessor_config.json").write_text(json.dumps(dict(
        do_resize=True, size={"shortest_edge": n}, do_center_crop=True, crop_size={"height": n, "width": n},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711]), indent=2))
    save_file(to_state_dict(adapter.eval(), pipe.unet), str(folder / ADAPTER_FILE))
    for name in ("train_summary.json", "train_config.json"):
        if out is not None and (out / name).exists():
            (folder / name).write_text((out / name).read_text())
    card = folder.parent / "overpaint.json"  # exported into its model's folder: the card now names the adapter
    if model is not None and folder.resolve() == (model / Path(IP_ADAPTER).parent).resolve() and card.is_file():
        data = json.loads(card.read_text())
        if data.get("ip_adapter") != IP_ADAPTER:  # the card's other entries are kept as they were
            card.write_text(json.dumps({**data, "ip_adapter": IP_ADAPTER}, indent=2) + "\n")
            print(f"{card}: now names the adapter ({IP_ADAPTER}), so pipe.load_ip_adapter() finds it")
    return folder / ADAPTER_FILE


def run(cfg: IPTrainConfig) -> Path:
    """Train (or resume); writes the adapter to ``cfg.out`` (and ``cfg.export``); returns the adapter file."""
    import engine

    out, ckpt_path, t0, budget = _start(cfg)
    pipe = engine.load(cfg.model, device=cfg.device)
    if getattr(pipe, "unet", None) is None:
        raise SystemExit(f"train_ip trains IP-Adapters for UNet Shapes models; {cfg.model!r} is not one "
                         f"(use --model shapes, shapes-v2 or such a pipeline folder)")
    if cfg.screens is None:
        cfg.screens = model_screens(cfg.model)
    pipe.unet.requires_grad_(False)
    encoder, adapter = build(cfg, pipe)
    encoder.to(cfg.device), adapter.to(cfg.device)
    opt = torch.optim.AdamW([p for m in (encoder, adapter) for p in m.parameters()], lr=cfg.lr, weight_decay=0.01)
    ema = EMA([encoder, adapter], cfg.ema_decay) if cfg.ema_decay > 0 else None
    step = 0
    if cfg.resume and ckpt_path.exists():
        st = torch.load(ckpt_path, map_location=cfg.device, weights_only=False)
        encoder.load_state_dict(st["encoder"]), adapter.load_state_dict(st["adapter"]), opt.load_state_dict(st["opt"])
        if ema is not None and st.get("ema") is not None:
            ema.shadow = [s.to(cfg.device) for s in st["ema"]]
        step = st["step"]
        print(f"resuming from {ckpt_path}: step {step}")
    logger = Logger(out / "train_log.csv", ("ip", step) if cfg.resume else None)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    def checkpoint(_stage: str, step_now: int) -> None:
        _save_checkpoint(ckpt_path, step=step_now, encoder=encoder.state_dict(), adapter=adapter.state_dict(),
                         opt=opt.state_dict(), ema=None if ema is None else ema.shadow, seed=cfg.seed)

    s0, ts = step, time.time()
    step = train(cfg, pipe, encoder, adapter, opt, ema, step, t0 + budget - 30.0 * (not cfg.smoke), t0, logger,
                 checkpoint)
    summary = {"ip_steps": step, "wall_s": round(time.time() - t0, 1),
               "encoder_params": sum(p.numel() for p in encoder.parameters()),
               "adapter_params": sum(p.numel() for p in adapter.parameters())}
    if step > s0:
        summary["s_per_step"] = round((time.time() - ts) / (step - s0), 4)
    checkpoint("ip", step)
    if ema is not None:
        ema.copy_to([encoder, adapter])
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    file = export(out, pipe, encoder, adapter)
    if cfg.export:
        from engine.loader import resolve

        file = export(Path(cfg.export), pipe, encoder, adapter, out, resolve(cfg.model))
    print(json.dumps(summary))
    return file


def parse_args(argv: list[str] | None = None) -> IPTrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = IPTrainConfig(out="")
    trainer_args(p, d, "adapter")
    p.add_argument("--model", default=d.model, help="the Shapes pipeline to train for (default: the bundled one)")
    p.add_argument("--screens", type=float, default=None,
                   help="share of scenes on green or blue screens (default: the model's own training share)")
    a = p.parse_args(argv)
    cfg = IPTrainConfig(out=a.out, model=a.model, screens=a.screens, seed=a.seed, lr=a.lr, ema_decay=a.ema_decay, threads=a.threads, device=a.device,
                        resume=a.resume, smoke=a.smoke, progress=not a.no_progress, export=a.export)
    if a.smoke:
        cfg.steps, cfg.batch_size, cfg.encoder_width, cfg.encoder_layers, cfg.tokens = 4, 4, 64, 2, 4
        cfg.ckpt_every, cfg.warmup, cfg.time_budget_min, cfg.log_every = 2, 2, 1.0, 1
    explicit_flags(cfg, a, ("steps", "batch_size", "time_budget_min", "ckpt_every"))
    if cfg.steps < 1 or cfg.batch_size < 1 or not cfg.time_budget_min > 0:
        p.error("--steps and --batch-size must be at least 1, --time-budget-min positive")
    if cfg.screens is not None and not 0 <= cfg.screens <= 1:
        p.error(f"--screens is a share between 0 and 1, got {cfg.screens}")
    return cfg


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
