"""Train the Shapes text-to-image model from scratch and save it as a diffusers pipeline.

    python -m engine.shapes.train --out /tmp/shapes-run --seed 0 --export engine/shapes/model   # the shipped model
    python -m engine.shapes.train --out /tmp/v2-run --seed 0 --screens 0.3333 --steps 5000 --fp32 \
        --time-budget-min 150 --export engine/shapes/model_v2                                    # "shapes-v2"
    python -m engine.shapes.train --out /tmp/s --smoke          # ~1 minute, tiny widths

Three stages, on scenes rendered on the fly (batch ``b`` of stage ``k`` at step
``i`` comes from ``np.random.default_rng([seed, k, i])``, so a resumed run sees the
same data as an uninterrupted one):
  1. vae   AutoencoderKL on random 32x32 crops, L1 + L2 reconstruction with object pixels weighted up,
           a small KL; then each latent channel is standardised, folded into the VAE's 1x1 quant convs
           (normalise_latents).
  2. text  the CLIP text encoder learns to decode the scene (what is in each slot, the background)
           from its tokens (engine.shapes.scene_code); seconds, captions only.
           In stages 2 and 3, 20% of captions are fragments that name only some objects or only
           the background (world.fragment), the phrases LEDITS++ uses as concepts.
           ``--screens p``: a share p of all stages' scenes is on a green or blue screen
           (world.SCREENS), so the model can paint the backdrop chroma keying needs.
  3. unet  UNet on the frozen text encoder, v-prediction (Salimans & Ho 2022) on SD's
           scaled_linear schedule with Min-SNR-5 weights, 10% empty captions for classifier-free
           guidance, AdamW with warmup and cosine decay, gradient clipping, EMA of the weights,
           bfloat16 autocast. Pilots (1000 UNet steps each, 60 prompts): text encoder trained jointly
           by the diffusion loss alone, 3% of prompts right; scene code + Min-SNR, 28%. Earlier, with
           epsilon prediction the unconditional prior was learned but not the caption.
Each stage ends at its step count or its share of ``--time-budget-min``.
``OUT/checkpoint.pt`` is written every ``--ckpt-every`` steps; ``--resume`` continues
from it (bit-identically on the same machine and thread count; the time budget
counts from the new invocation). The VAE's reconstructions are scored with the
analyser (``vae_recon_match`` in ``OUT/train_summary.json``). Losses go to ``OUT/train_log.csv``; the pipeline (EMA weights) to ``OUT/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from engine.shapes import world
from engine.shapes import recipes
from engine.shapes.model import ModelSizes, build, folder_megabytes, save_pipeline

STAGES = ("vae", "text", "unet", "t5", "dit", "ip", "done")  # the UNet run's, the DiT run's (train_dit), the IP-Adapter's
LOG_FIELDS = ("stage", "step", "loss", "lr", "elapsed_s")


@dataclass
class TrainConfig:
    out: str
    seed: int = 0
    # Fixed step counts make the result independent of machine speed; the time budget is a safety net.
    steps: int = 7000  # UNet steps (0.383 s each in the shipped run: batch 16, two threads, bf16, frozen text encoder)
    vae_steps: int = 3000  # 0.17 s each on 32x32 crops in the shipped run
    batch_size: int = 16  # more, smaller steps learned the caption faster than fewer large ones
    vae_batch_size: int = 32
    vae_crop: int = 32  # VAE trains on random crops (0: whole images); its convs are translation-equivariant
    lr: float = 1e-3
    vae_lr: float = 2e-3
    warmup: int = 100  # UNet lr warm-up steps
    vae_warmup: int = 50
    kl_weight: float = 3e-5  # per latent element; keeps the posterior from collapsing
    # Object pixels weigh 1 + this in the VAE's reconstruction loss: objects cover ~10% of a scene, and
    # with uniform weights the VAE got 9% of scenes' colours or shapes wrong (black on gray came back green).
    vae_object_weight: float = 5.0
    cfg_drop: float = 0.1
    # Share of captions (text and UNet stages) that name only part of the scene: some objects, or
    # the background alone (engine.shapes.world.fragment). LEDITS++ guides with such phrases as
    # concepts ("a small blue circle on the left"); a model that only ever saw whole captions drew
    # a fragment's object as a new scene, and colour swaps succeeded 43% of the time.
    partial_captions: float = 0.2
    # Share of scenes (every stage) on a green or blue screen (engine.shapes.world.SCREENS): a model
    # that never saw one cannot paint the backdrop a chroma key (TKG-DM) asks for. 0: the classic
    # world only (the model shipped before screens were added was trained so).
    screens: float = 0.0
    text_steps: int = 250  # scene-code pretraining of the text encoder (engine.shapes.scene_code); 0 skips it
    text_batch_size: int = 64
    freeze_text: bool = True  # keep the scene-coded text encoder fixed in the UNet stage (as SD keeps CLIP)
    # Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    # Weighting Strategy"): per-sample weight min(SNR, gamma) / (SNR + 1) for v (/ SNR for epsilon),
    # so the nearly clean steps, which only polish texture, stop dominating the gradient. 0: off.
    min_snr: float = 5.0
    # What the UNet predicts. v (Salimans & Ho 2022) weighs x0 errors by 1 + SNR where epsilon weighs
    # them by SNR (~0.005 at t=999): the noisy steps, where colour, shape and place are decided and the
    # caption matters, get a real share of the gradient.
    prediction: str = "v_prediction"
    noisy_frac: float = 0.0  # share of each batch whose t is drawn from the noisier half [500, 1000)
    bf16: bool = True  # bfloat16 autocast for the UNet and text encoder (fp32 weights, optimiser and loss)
    ema_decay: float = 0.999  # 0 disables EMA
    device: str = "cpu"
    lr_decay: bool = True  # cosine decay over each stage's step count (off for --smoke, whose step counts vary)
    time_budget_min: float = 60.0
    vae_budget_frac: float = 0.3
    ckpt_every: int = 200
    log_every: int = 10
    threads: int = 2  # 0: torch's default; 2 was 1.24x faster than 1 on an idle 2-core CPU (but slower when shared)
    export: str = ""  # also write the finished pipeline (no checkpoint or log) here
    resume: bool = False
    smoke: bool = False
    progress: bool = True

    def sizes(self) -> ModelSizes:
        return ModelSizes.smoke() if self.smoke else ModelSizes()


# ----------------------------------------------------------------------------- data


def scene_batch(seed: int, stage: int, step: int, n: int, masks: bool = False, partial: float = 0.0,
                screens: float = 0.0):
    """Rendered scenes in [-1, 1] as [n, 3, 64, 64] and their captions, fixed by (seed, stage, step);
    a ``partial`` share of the captions are fragments (:func:`world.sample_fragment`), a ``screens``
    share of the scenes on green or blue screens; with ``masks`` also the union of each scene's
    object masks as [n, 1, 64, 64] floats."""
    rng = np.random.default_rng([seed, stage, step])
    scenes = [world.sample_scene(rng, screens=screens) for _ in range(n)]
    imgs = np.stack([world.render(s) for s in scenes])  # [n, 64, 64, 3] uint8
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [n, 3, 64, 64]
    caps = [world.fragment(s, *world.sample_fragment(s, rng, partial)) for s in scenes]
    if not masks:
        return x, caps
    m = np.stack([world.render_masks(s).any(0) for s in scenes])  # [n, 64, 64] bool
    return x, caps, torch.from_numpy(m).unsqueeze(1).float()


def random_crops(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` crop per image (offsets multiples of 4, the VAE factor): [B, 3, size, size]."""
    if not size or size >= x.shape[-1]:
        return x
    off = torch.randint(0, (x.shape[-1] - size) // 4 + 1, (len(x), 2), generator=g) * 4  # [B, 2]
    return torch.stack([im[:, i:i + size, j:j + size] for im, (i, j) in zip(x, off.tolist())])


def timesteps(n: int, total: int, noisy_frac: float, g: torch.Generator) -> torch.Tensor:
    """Training timesteps [n]: uniform, except a ``noisy_frac`` share drawn from the noisier half."""
    t = torch.randint(0, total, (n,), generator=g)  # [n]
    noisy = torch.rand(n, generator=g) < noisy_frac
    return torch.where(noisy, total // 2 + t // 2, t)


def snr_weight(abar: torch.Tensor, prediction: str, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights [B] for timesteps with cumulative alphas ``abar`` [B] (1 when gamma is 0)."""
    if not gamma:
        return torch.ones_like(abar)
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / (snr + 1 if prediction == "v_prediction" else snr)


def _generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, stage, step, 7]).integers(2**62)))


class TokenCache:
    """Token ids padded to the full CLIP window, as the SD pipeline feeds them; cached per caption."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.tok(c, padding="max_length", max_length=self.tok.model_max_length,
                                         truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([self.cache[c] for c in captions])  # [B, 77]


# ----------------------------------------------------------------------------- state


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for m in modules for p in m.parameters()]

    @torch.no_grad()
    def update(self, modules: list[torch.nn.Module], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, (p for m in modules for p in m.parameters())):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        for s, p in zip(self.shadow, (p for m in modules for p in m.parameters())):
            p.copy_(s)


def trained_modules(cfg: TrainConfig, m) -> list[torch.nn.Module]:
    """The modules the UNet stage trains, whose EMA is exported (a frozen text encoder ships as trained)."""
    return [m.unet] if cfg.freeze_text else [m.unet, m.text_encoder]


def _save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoint


class Logger:
    """Appends loss rows to a CSV; on resume drops rows past the checkpoint."""

    def __init__(self, path: Path, resume_at: tuple[str, int] | None):
        self.path = path
        rows = []
        if resume_at and path.exists():
            with path.open() as f:
                order = {s: i for i, s in enumerate(STAGES)}
                limit = (order[resume_at[0]], resume_at[1])
                rows = [r for r in csv.DictReader(f) if (order[r["stage"]], int(r["step"])) < limit]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def log(self, **row) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writerow(row)


def _lr(base: float, step: int, warmup: int, total: int = 0) -> float:
    """Linear warm-up, then (with ``total``) a cosine decay to 10% of ``base`` at step ``total``."""
    lr = base * min(1.0, (step + 1) / max(1, warmup))
    if total > warmup and step >= warmup:
        frac = min(1.0, (step - warmup) / (total - warmup))
        lr *= 0.1 + 0.45 * (1.0 + math.cos(math.pi * frac))
    return lr


def _bar(cfg: TrainConfig, start: int, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, disable=not cfg.progress, dynamic_ncols=True)


def _update(opt, loss, params) -> None:
    """One optimiser step on ``loss``, gradients clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _after_step(cfg, stage: str, step: int, total: int, loss: float, lr: float, bar, logger, t0: float,
                checkpoint) -> None:
    """Progress bar, the loss log and the checkpoint after ``step`` (counted from 1) of ``stage``."""
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}")
    if step % cfg.log_every == 0 or step in (1, total):
        logger.log(stage=stage, step=step, loss=f"{loss:.5f}", lr=f"{lr:.2e}", elapsed_s=f"{time.time() - t0:.1f}")
    if step % cfg.ckpt_every == 0:
        checkpoint(stage, step)


# ----------------------------------------------------------------------------- stages


def train_vae(cfg, m, opt, start: int, deadline: float, t0: float, logger, checkpoint) -> int:
    """Autoencoder stage; returns the number of steps done in total."""
    vae, step = m.vae.train(), start
    bar = _bar(cfg, start, cfg.vae_steps, "vae")
    while step < cfg.vae_steps and time.time() < deadline:
        x, _, mask = scene_batch(cfg.seed, 0, step, cfg.vae_batch_size, masks=True, screens=cfg.screens)
        gen = _generator(cfg.seed, 0, step)
        xm = random_crops(torch.cat([x, mask], 1), cfg.vae_crop, gen).to(cfg.device)  # 4x cheaper than 64x64
        x, w = xm[:, :3], 1.0 + cfg.vae_object_weight * xm[:, 3:]  # [B, 3, crop, crop], [B, 1, crop, crop]
        for g in opt.param_groups:
            g["lr"] = _lr(cfg.vae_lr, step, cfg.vae_warmup, cfg.vae_steps if cfg.lr_decay else 0)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(x)
        rec = vae.decode(z).sample  # [B, 3, crop, crop]
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        err = rec - x
        loss = ((err.abs() + err.square()) * w).mean() / w.mean() + cfg.kl_weight * kl
        _update(opt, loss, vae.parameters())
        step += 1
        _after_step(cfg, "vae", step, cfg.vae_steps, loss.item(), opt.param_groups[0]["lr"], bar, logger, t0, checkpoint)
    bar.close()
    return step


@torch.no_grad()
def normalise_latents(cfg, vae, n: int = 256) -> dict:
    """Fold a per-channel standardisation of the latents into the VAE; sets ``scaling_factor`` 1.

    SD scales all latent channels by one factor (1 / their pooled std). Ours came out with
    channel stds ~0.6 / 1.7 / 4.4 / 1.2, so under one factor the quiet channels drown in noise
    at a fraction of the loud one's timestep and the schedule fits none of them. Encoding with
    ``quant_conv``'s mean rows divided by sigma_c (mu_c subtracted) and decoding with
    ``post_quant_conv``'s columns times sigma_c (its bias moved by W mu) gives every channel zero
    mean and unit variance while the checkpoint stays a plain diffusers ``AutoencoderKL``.
    """
    vae.eval()
    x, _ = scene_batch(cfg.seed, 2, 0, n, screens=cfg.screens)
    z = torch.cat([vae.encode(c.to(cfg.device)).latent_dist.mean for c in x.split(64)])  # [n, 4, h, w]
    mu, sigma = z.mean((0, 2, 3)), z.std((0, 2, 3))  # [4], [4]
    c = len(mu)
    q, pq = vae.quant_conv, vae.post_quant_conv  # 1x1 convs: [2c, C, 1, 1] (mean rows, then log-variance), [c, c, 1, 1]
    q.weight[:c] /= sigma.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mu) / sigma
    q.bias[c:] -= 2 * sigma.log()  # log-variance of z / sigma
    pq.bias += pq.weight[:, :, 0, 0] @ mu
    pq.weight *= sigma.view(1, -1, 1, 1)
    vae.register_to_config(scaling_factor=1.0)
    return {"latent_mean": mu.tolist(), "latent_std": sigma.tolist()}


@torch.no_grad()
def vae_match_rate(cfg, vae, n: int = 64) -> float:
    """Share of held-out scenes whose VAE reconstruction the analyser still reads exactly."""
    from engine.shapes import analyser

    vae.eval()
    rng = np.random.default_rng([cfg.seed, 3])
    scenes = [world.sample_scene(rng, screens=cfg.screens) for _ in range(n)]
    x = torch.from_numpy(np.stack([world.render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec = vae.decode(vae.encode(x.to(cfg.device)).latent_dist.mean).sample.clamp(-1, 1)  # [n, 3, 64, 64]
    imgs = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # [n, 64, 64, 3]
    return float(np.mean([analyser.matches(i, s) for i, s in zip(imgs, scenes)]))


def train_text(cfg, m, t0: float, logger) -> dict:
    """Scene-code stage (seconds): the text encoder learns to decode the scene from its end tokens."""
    from engine.shapes import scene_code

    if not cfg.text_steps:
        return {}
    ts, bar = time.time(), _bar(cfg, 0, cfg.text_steps, "text")
    log = lambda i, loss: logger.log(stage="text", step=i, loss=f"{loss:.5f}", lr=f"{cfg.lr:.2e}",  # noqa: E731
                                     elapsed_s=f"{time.time() - t0:.1f}")
    acc = scene_code.pretrain(m.text_encoder, TokenCache(m.tokenizer), m.tokenizer.eos_token_id, cfg.seed,
                              cfg.text_steps, cfg.text_batch_size, cfg.lr, cfg.device, bar, log,
                              cfg.partial_captions, screens=cfg.screens)
    bar.close()
    print(f"text: {cfg.text_steps} steps, end tokens decode {acc:.1%} of held-out scene labels")
    return {"text_s": round(time.time() - ts, 1), "text_code_accuracy": round(acc, 4)}


def train_unet(cfg, m, opt, ema, start: int, deadline: float, t0: float, logger, checkpoint) -> int:
    """Joint UNet + text-encoder stage; returns the number of steps done in total."""
    from engine.shapes.model import scheduler

    tokens = TokenCache(m.tokenizer)
    abar = scheduler(cfg.prediction).alphas_cumprod.to(cfg.device)  # [1000]
    sf = m.vae.config.scaling_factor
    m.vae.eval().requires_grad_(False)
    m.unet.train(), m.text_encoder.train(not cfg.freeze_text).requires_grad_(not cfg.freeze_text)
    params = [p for mod in (m.unet, m.text_encoder) for p in mod.parameters()]
    step = start
    bar = _bar(cfg, start, cfg.steps, "unet")
    while step < cfg.steps and time.time() < deadline:
        x, caps = scene_batch(cfg.seed, 1, step, cfg.batch_size, partial=cfg.partial_captions, screens=cfg.screens)
        g = _generator(cfg.seed, 1, step)
        drop = torch.rand(len(caps), generator=g) < cfg.cfg_drop
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        for group in opt.param_groups:
            group["lr"] = _lr(cfg.lr, step, cfg.warmup, cfg.steps if cfg.lr_decay else 0)
        with torch.no_grad():
            post = m.vae.encode(x.to(cfg.device)).latent_dist
            z0 = (post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(post.mean)) * sf  # [B, 4, 16, 16]
        t = timesteps(len(caps), len(abar), cfg.noisy_frac, g).to(cfg.device)  # [B]
        eps = torch.randn(z0.shape, generator=g).to(z0)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps  # forward diffusion q(z_t | z_0)
        target = eps if cfg.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z0  # v = da/dphi
        with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            with torch.set_grad_enabled(not cfg.freeze_text):
                ctx = m.text_encoder(tokens(caps).to(cfg.device)).last_hidden_state  # [B, 77, D]
            pred = m.unet(zt, t, ctx).sample  # [B, 4, 16, 16]
        loss = (snr_weight(a.view(-1), cfg.prediction, cfg.min_snr)
                * (pred.float() - target).pow(2).mean((1, 2, 3))).mean()  # [B] -> ()
        _update(opt, loss, params)
        if ema is not None:
            ema.update(trained_modules(cfg, m), step)
        step += 1
        _after_step(cfg, "unet", step, cfg.steps, loss.item(), opt.param_groups[0]["lr"], bar, logger, t0, checkpoint)
    bar.close()
    return step


# ----------------------------------------------------------------------------- driver


def _start(cfg) -> tuple[Path, Path, float, float]:
    """Threads, the output folder, the checkpoint's path, the start time, the budget in seconds; seeds torch."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, budget = time.time(), cfg.time_budget_min * 60.0
    torch.manual_seed(cfg.seed)
    return out, out / "checkpoint.pt", t0, budget


def run(cfg: TrainConfig) -> Path:
    """Train (or resume) and write the pipeline to ``cfg.out``; returns that folder."""
    out, ckpt_path, t0, budget = _start(cfg)
    if cfg.bf16 and torch.device(cfg.device).type == "cpu" and torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        # measured on a 2-core AVX2 EPYC: UNet steps 6.7 s with bfloat16 autocast, 0.75-0.78 s in float32
        print(f"note: torch reports this CPU's vector capability as {torch.backends.cpu.get_cpu_capability()} (no "
              f"AVX-512), where bfloat16 autocast is emulated: the UNet stage can run ~9x slower than in float32; "
              f"consider --fp32 (the VAE and text stages are the same either way)")
    m = build(cfg.sizes(), out / "tokenizer")
    m.vae.to(cfg.device), m.unet.to(cfg.device), m.text_encoder.to(cfg.device)
    vae_opt = torch.optim.AdamW(m.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    unet_params = [p for mod in (m.unet, m.text_encoder) for p in mod.parameters()]
    unet_opt = torch.optim.AdamW(unet_params, lr=cfg.lr, weight_decay=0.01)
    ema = EMA(trained_modules(cfg, m), cfg.ema_decay) if cfg.ema_decay > 0 else None
    stage, step = "vae", 0
    if cfg.resume and ckpt_path.exists():
        st = torch.load(ckpt_path, map_location=cfg.device, weights_only=False)
        m.vae.load_state_dict(st["vae"]), m.unet.load_state_dict(st["unet"]), m.text_encoder.load_state_dict(st["text_encoder"])
        vae_opt.load_state_dict(st["vae_opt"]), unet_opt.load_state_dict(st["unet_opt"])
        if ema is not None and st.get("ema") is not None:
            ema.shadow = [s.to(cfg.device) for s in st["ema"]]
        m.vae.register_to_config(scaling_factor=st["scaling_factor"])
        stage, step = st["stage"], st["step"]
        print(f"resuming from {ckpt_path}: stage {stage}, step {step}")
    logger = Logger(out / "train_log.csv", (stage, step) if cfg.resume else None)
    (out / "train_config.json").write_text(json.dumps({**asdict(cfg), "sizes": cfg.sizes().to_dict()}, indent=2))

    def checkpoint(stage_now: str, step_now: int) -> None:
        _save_checkpoint(
            ckpt_path, stage=stage_now, step=step_now, vae=m.vae.state_dict(), unet=m.unet.state_dict(),
            text_encoder=m.text_encoder.state_dict(), vae_opt=vae_opt.state_dict(), unet_opt=unet_opt.state_dict(),
            ema=None if ema is None else ema.shadow, scaling_factor=float(m.vae.config.scaling_factor),
            seed=cfg.seed,
        )

    timings = {}
    if stage == "vae":
        s0, ts = step, time.time()
        step = train_vae(cfg, m, vae_opt, step, t0 + cfg.vae_budget_frac * budget, t0, logger, checkpoint)
        if step > s0:  # a resume past the stage's last step times nothing
            timings["vae_s_per_step"] = (time.time() - ts) / (step - s0)
        timings.update(normalise_latents(cfg, m.vae))
        timings["vae_recon_match"] = vae_match_rate(cfg, m.vae, 16 if cfg.smoke else 64)
        print(f"vae: {step} steps, analyser matches {timings['vae_recon_match']:.0%} of reconstructions")
        stage, step = "text", 0
        checkpoint(stage, step)
    if stage == "text":
        timings.update(train_text(cfg, m, t0, logger))
        stage, step = "unet", 0
        checkpoint(stage, step)
    if stage == "unet":
        s0, ts = step, time.time()
        step = train_unet(cfg, m, unet_opt, ema, step, t0 + budget - 30.0 * (not cfg.smoke), t0, logger, checkpoint)
        if step > s0:
            timings["unet_s_per_step"] = (time.time() - ts) / (step - s0)
        checkpoint(stage, step)
    if ema is not None:
        ema.copy_to(trained_modules(cfg, m))  # export the averaged weights
    m.vae.eval(), m.unet.eval(), m.text_encoder.eval()
    save_pipeline(m, out, prediction_type=cfg.prediction)
    summary = {"unet_steps": step, "scaling_factor": float(m.vae.config.scaling_factor),
               "wall_s": round(time.time() - t0, 1), "safetensors_mb": round(folder_megabytes(out), 2), **timings}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.export:  # the shippable folder: the pipeline plus how it was made
        export = Path(cfg.export)
        save_pipeline(m, export, prediction_type=cfg.prediction)
        # the editing recipes and vocabulary that ship with it; no IP-Adapter: one already in the
        # folder was trained for the UNet this run replaced (engine.shapes.train_ip names its own
        # in the card when it exports one there)
        recipes.write_card(export, recipes.model_card(ip_adapter=False))
        if (export / recipes.IP_ADAPTER).is_file():
            print(f"note: {export / recipes.IP_ADAPTER} was trained for the UNet this run replaced, so the card no "
                  f"longer names it; retrain it: python -m engine.shapes.train_ip --model {export} --out RUN "
                  f"--export {export / 'ip_adapter'}")
        for name in ("train_summary.json", "train_config.json"):
            (export / name).write_text((out / name).read_text())
    print(json.dumps(summary))
    return out


@dataclass
class RunSettings:
    """How a later Shapes training run runs (the DiT's and the IP-Adapter's configs extend it)."""

    out: str
    ema_decay: float = 0.999
    time_budget_min: float = 60.0
    ckpt_every: int = 200
    log_every: int = 10
    threads: int = 2
    device: str = "cpu"
    export: str = ""
    resume: bool = False
    smoke: bool = False
    progress: bool = True


def explicit_flags(cfg, a: argparse.Namespace, names) -> None:
    """Flags the user gave (not None) win over a config's preset (the smoke one)."""
    for name in names:
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))


def trainer_args(p: argparse.ArgumentParser, d, what: str) -> None:
    """The flags the later Shapes trainers share (the DiT's, the IP-Adapter's); ``d`` their
    config's defaults, ``what`` what their ``--steps`` count."""
    p.add_argument("--out", required=True, help="folder to write (checkpoint and logs go here too)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=None, help=f"{what} steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--time-budget-min", type=float, default=None)
    p.add_argument("--ckpt-every", type=int, default=None)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--device", default=d.device)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--smoke", action="store_true", help="tiny widths and few steps, for tests")
    p.add_argument("--export", default="", help="also write the result (without checkpoint) here")
    p.add_argument("--no-progress", action="store_true")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = TrainConfig(out="")
    p.add_argument("--out", required=True, help="pipeline folder to write (checkpoint and logs go here too)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=None, help="UNet steps (default: until the time budget)")
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help=f"UNet batch (default {d.batch_size})")
    p.add_argument("--vae-batch-size", type=int, default=None, help=f"VAE batch (default {d.vae_batch_size})")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--vae-lr", type=float, default=d.vae_lr)
    p.add_argument("--vae-object-weight", type=float, default=d.vae_object_weight)
    p.add_argument("--vae-crop", type=int, default=d.vae_crop, help="VAE training crop side (0: whole images)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--time-budget-min", type=float, default=None)
    p.add_argument("--vae-budget-frac", type=float, default=None,
                   help=f"share of the time budget for the VAE stage (default {d.vae_budget_frac})")
    p.add_argument("--ckpt-every", type=int, default=None, help=f"checkpoint period in steps (default {d.ckpt_every})")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--prediction", choices=("epsilon", "v_prediction"), default=d.prediction)
    p.add_argument("--noisy-frac", type=float, default=d.noisy_frac)
    p.add_argument("--text-steps", type=int, default=None,
                   help=f"scene-code pretraining steps of the text encoder (default {d.text_steps}; 0 skips)")
    p.add_argument("--partial-captions", type=float, default=d.partial_captions,
                   help="share of training captions that name only part of the scene")
    p.add_argument("--screens", type=float, default=d.screens,
                   help="share of training scenes on a green or blue screen (default 0: the classic world)")
    p.add_argument("--train-text", action="store_true", help="train the text encoder jointly in the UNet stage")
    p.add_argument("--min-snr", type=float, default=d.min_snr, help="Min-SNR-gamma loss weighting (0: off)")
    p.add_argument("--fp32", action="store_true", help="no bfloat16 autocast")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--smoke", action="store_true", help="tiny widths and few steps (~1 minute), for tests")
    p.add_argument("--export", default="", help="also write the finished pipeline (without checkpoint) here")
    p.add_argument("--no-lr-decay", action="store_true", help="constant lr after warm-up")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = TrainConfig(out=a.out, seed=a.seed, lr=a.lr, vae_lr=a.vae_lr, vae_crop=a.vae_crop, vae_object_weight=a.vae_object_weight, device=a.device,
                      ema_decay=a.ema_decay, prediction=a.prediction, noisy_frac=a.noisy_frac, min_snr=a.min_snr,
                      partial_captions=a.partial_captions, screens=a.screens, freeze_text=not a.train_text, bf16=not a.fp32,
                      threads=a.threads, resume=a.resume, smoke=a.smoke, progress=not a.no_progress,
                      lr_decay=not (a.no_lr_decay or a.smoke), export=a.export)
    if a.smoke:  # small enough for a unit test; still exercises every code path
        cfg.steps, cfg.vae_steps, cfg.batch_size, cfg.vae_batch_size = 40, 20, 8, 8
        cfg.ckpt_every, cfg.warmup, cfg.vae_warmup, cfg.time_budget_min, cfg.log_every = 20, 10, 5, 1.0, 5
        cfg.text_steps, cfg.text_batch_size = 10, 16
    explicit_flags(cfg, a, ("steps", "vae_steps", "text_steps", "batch_size", "vae_batch_size", "time_budget_min",
                            "ckpt_every", "vae_budget_frac"))
    if not math.isfinite(cfg.time_budget_min) or cfg.time_budget_min <= 0:
        p.error("--time-budget-min must be positive")
    for flag, value in (("--min-snr", cfg.min_snr), ("--vae-object-weight", cfg.vae_object_weight),
                        ("--text-steps", cfg.text_steps)):
        if not math.isfinite(value) or value < 0:
            p.error(f"{flag} must be 0 or more (0 turns it off), got {value}")
    for flag, value in (("--partial-captions", cfg.partial_captions), ("--screens", cfg.screens)):
        if not 0 <= value <= 1:
            p.error(f"{flag} is a share between 0 and 1, got {value}")
    return cfg


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
