"""Train the Shapes DiT (:mod:`engine.shapes.dit`) and save it as a diffusers FluxPipeline.

    python -m engine.shapes.train_dit --out /tmp/dit-run --export engine/shapes/dit_model   # the shipped model
    python -m engine.shapes.train_dit --out /tmp/d --smoke                                  # seconds, tiny widths

The VAE and the CLIP text encoder are the Shapes model's (frozen). Two stages:
  1. t5   the T5 encoder learns to decode the scene from its tokens (:mod:`engine.shapes.scene_code`,
          as the Shapes CLIP did: per token, what is where once the caption has said it); seconds.
  2. dit  the transformer by rectified flow (Liu et al. 2022; Esser et al. 2024, "Scaling Rectified
          Flow Transformers"): x_s = (1 - s) x0 + s eps, target eps - x0, s logit-normal; frozen text
          encoders, 10% empty captions for classifier-free guidance, 20% partial captions, AdamW with
          warm-up and cosine decay, EMA, fp32.
Scenes come from ``np.random.default_rng([seed, stage, step])`` as in :mod:`engine.shapes.train`;
``--resume`` continues from ``OUT/checkpoint.pt``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.shapes import recipes, scene_code
from engine.models.flux import image_ids, pack
from engine.shapes.dit import DiTSizes, build, fit_vocab, save_pipeline
from engine.shapes.model import folder_megabytes
from engine.shapes.train import (EMA, Logger, TokenCache, _after_step, _bar, _generator, _lr, _save_checkpoint,
                                 _start, _update, RunSettings, explicit_flags, scene_batch, trainer_args)

DIT_STAGE = 5  # data stream ids (scene_batch's ``stage``): distinct from the UNet run's


@dataclass
class DiTTrainConfig(RunSettings):
    seed: int = 0
    steps: int = 3000  # ~0.8 s each on the 2-core CPU (batch 32, fp32)
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 100
    cfg_drop: float = 0.1
    partial_captions: float = 0.2
    t5_steps: int = 300
    t5_batch_size: int = 64
    t5_lr: float = 1e-3
    bf16: bool = False  # CPU bfloat16 autocast ran this transformer 13x slower than fp32

    def sizes(self) -> DiTSizes:
        return DiTSizes.smoke() if self.smoke else DiTSizes()


def logit_normal(n: int, g: torch.Generator) -> torch.Tensor:
    """Flow times s in (0, 1) [n]: sigmoid of a standard normal (SD3's logit-normal sampling)."""
    return torch.sigmoid(torch.randn(n, generator=g))


class Encoders:
    """The frozen text encoders as FluxPipeline calls them: CLIP pooled [B, P], T5 sequence [B, L, D]."""

    def __init__(self, m, device):
        self.m, self.device = m, device
        self.clip_tokens, self.t5_tokens = TokenCache(m.tokenizer), TokenCache(m.tokenizer_2)

    @torch.no_grad()
    def __call__(self, caps: list[str]):
        pooled = self.m.text_encoder(self.clip_tokens(caps).to(self.device)).pooler_output  # [B, P]
        seq = self.m.text_encoder_2(self.t5_tokens(caps).to(self.device)).last_hidden_state  # [B, L, D]
        return pooled, seq


def train_t5(cfg: DiTTrainConfig, m, t0: float, logger) -> dict:
    ts, bar = time.time(), _bar(cfg, 0, cfg.t5_steps, "t5")
    log = lambda i, loss: logger.log(stage="t5", step=i, loss=f"{loss:.5f}", lr=f"{cfg.t5_lr:.2e}",  # noqa: E731
                                     elapsed_s=f"{time.time() - t0:.1f}")
    tok = m.tokenizer_2
    acc = scene_code.pretrain(m.text_encoder_2, TokenCache(tok), tok.eos_token_id, cfg.seed, cfg.t5_steps,
                              cfg.t5_batch_size, cfg.t5_lr, cfg.device, bar, log, cfg.partial_captions,
                              length=tok.model_max_length, first=0)
    bar.close()
    m.text_encoder_2.eval().requires_grad_(False)
    print(f"t5: {cfg.t5_steps} steps, end tokens decode {acc:.1%} of held-out scene labels")
    return {"t5_s": round(time.time() - ts, 1), "t5_code_accuracy": round(acc, 4)}


def train_dit(cfg: DiTTrainConfig, m, opt, ema, start: int, deadline: float, t0: float, logger, checkpoint) -> int:
    enc = Encoders(m, cfg.device)
    net = m.transformer.train()
    ids = None
    step = start
    bar = _bar(cfg, start, cfg.steps, "dit")
    while step < cfg.steps and time.time() < deadline:
        x, caps = scene_batch(cfg.seed, DIT_STAGE, step, cfg.batch_size, partial=cfg.partial_captions)
        g = _generator(cfg.seed, DIT_STAGE, step)
        drop = torch.rand(len(caps), generator=g) < cfg.cfg_drop
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        for group in opt.param_groups:
            group["lr"] = _lr(cfg.lr, step, cfg.warmup, cfg.steps)
        with torch.no_grad():
            post = m.vae.encode(x.to(cfg.device)).latent_dist
            z0 = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(post.mean)  # [B, 4, 16, 16]
            pooled, seq = enc(caps)
        if ids is None:
            img_ids = image_ids(*z0.shape[-2:]).to(cfg.device)  # [N, 3]
            ids = (img_ids, torch.zeros(seq.shape[1], 3, device=cfg.device))
        s = logit_normal(len(caps), g).to(cfg.device)  # [B]
        eps = torch.randn(z0.shape, generator=g).to(z0)
        zs = (1 - s.view(-1, 1, 1, 1)) * z0 + s.view(-1, 1, 1, 1) * eps  # the straight path
        with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            pred = net(hidden_states=pack(zs), timestep=s, pooled_projections=pooled, encoder_hidden_states=seq,
                       txt_ids=ids[1], img_ids=ids[0], return_dict=False)[0]  # [B, N, 4C]
        loss = (pred.float() - pack(eps - z0)).pow(2).mean()
        _update(opt, loss, net.parameters())
        if ema is not None:
            ema.update([net], step)
        step += 1
        _after_step(cfg, "dit", step, cfg.steps, loss.item(), opt.param_groups[0]["lr"], bar, logger, t0, checkpoint)
    bar.close()
    return step


def run(cfg: DiTTrainConfig) -> Path:
    """Train (or resume) and write the pipeline to ``cfg.out``; returns that folder."""
    out, ckpt_path, t0, budget = _start(cfg)
    m = build(cfg.sizes(), out / "tokenizer_2")
    for mod in (m.vae, m.text_encoder, m.text_encoder_2, m.transformer):
        mod.to(cfg.device)
    opt = torch.optim.AdamW(m.transformer.parameters(), lr=cfg.lr, weight_decay=0.01)
    ema = EMA([m.transformer], cfg.ema_decay) if cfg.ema_decay > 0 else None
    stage, step = "t5", 0
    if cfg.resume and ckpt_path.exists():
        st = torch.load(ckpt_path, map_location=cfg.device, weights_only=False)
        rows = st["text_encoder_2"]["shared.weight"].shape[0]  # the vocabulary the checkpoint's T5 has
        if rows != m.text_encoder_2.get_input_embeddings().weight.shape[0]:
            m.text_encoder_2.resize_token_embeddings(rows)
        m.transformer.load_state_dict(st["transformer"]), m.text_encoder_2.load_state_dict(st["text_encoder_2"])
        opt.load_state_dict(st["opt"])
        if ema is not None and st.get("ema") is not None:
            ema.shadow = [s.to(cfg.device) for s in st["ema"]]
        stage, step = st["stage"], st["step"]
        m.text_encoder_2.eval().requires_grad_(False)
        print(f"resuming from {ckpt_path}: stage {stage}, step {step}")
    logger = Logger(out / "train_log.csv", (stage, step) if cfg.resume else None)
    (out / "train_config.json").write_text(json.dumps({**asdict(cfg), "sizes": cfg.sizes().to_dict()}, indent=2))

    def checkpoint(stage_now: str, step_now: int) -> None:
        _save_checkpoint(ckpt_path, stage=stage_now, step=step_now, transformer=m.transformer.state_dict(),
                         text_encoder_2=m.text_encoder_2.state_dict(), opt=opt.state_dict(),
                         ema=None if ema is None else ema.shadow, seed=cfg.seed)

    timings = {}
    if stage == "t5":
        timings.update(train_t5(cfg, m, t0, logger))
        stage, step = "dit", 0
        checkpoint(stage, step)
    s0, ts = step, time.time()
    step = train_dit(cfg, m, opt, ema, step, t0 + budget - 30.0 * (not cfg.smoke), t0, logger, checkpoint)
    if step > s0:
        timings["dit_s_per_step"] = round((time.time() - ts) / (step - s0), 4)
    checkpoint("dit", step)
    if ema is not None:
        ema.copy_to([m.transformer])
    m.transformer.eval()
    fit_vocab(m.text_encoder_2, m.tokenizer_2)
    save_pipeline(m, out)
    summary = {"dit_steps": step, "wall_s": round(time.time() - t0, 1),
               "safetensors_mb": round(folder_megabytes(out), 2),
               "transformer_params": sum(p.numel() for p in m.transformer.parameters()), **timings}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.export:
        export = Path(cfg.export)
        save_pipeline(m, export)
        recipes.write_card(export, recipes.dit_card())  # the editing recipes and vocabulary that ship with it
        for name in ("train_summary.json", "train_config.json"):
            (export / name).write_text((out / name).read_text())
    print(json.dumps(summary))
    return out


def parse_args(argv: list[str] | None = None) -> DiTTrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = DiTTrainConfig(out="")
    trainer_args(p, d, "transformer")
    p.add_argument("--t5-steps", type=int, default=None, help=f"scene-code steps of the T5 encoder (default {d.t5_steps})")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (for GPUs; slow on CPUs)")
    a = p.parse_args(argv)
    cfg = DiTTrainConfig(out=a.out, seed=a.seed, lr=a.lr, ema_decay=a.ema_decay, bf16=a.bf16, threads=a.threads,
                         device=a.device, resume=a.resume, smoke=a.smoke, progress=not a.no_progress, export=a.export)
    if a.smoke:
        cfg.steps, cfg.batch_size, cfg.t5_steps, cfg.t5_batch_size = 6, 4, 4, 8
        cfg.ckpt_every, cfg.warmup, cfg.time_budget_min, cfg.log_every = 3, 2, 1.0, 1
    explicit_flags(cfg, a, ("steps", "batch_size", "t5_steps", "time_budget_min", "ckpt_every"))
    if not math.isfinite(cfg.time_budget_min) or cfg.time_budget_min <= 0:
        p.error("--time-budget-min must be positive")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.t5_steps < 0:
        p.error("--steps and --batch-size must be at least 1, --t5-steps at least 0")
    return cfg


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
