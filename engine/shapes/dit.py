"""Architecture of the Shapes DiT: a FLUX-architecture model for the Shapes world, saved as a
diffusers ``FluxPipeline`` folder (``engine.load("shapes-dit")``; diffusers loads it too).

  vae             the Shapes model's AutoencoderKL (4 x 16 x 16 latents, already standardised:
                  scaling 1, shift 0); FLUX packs 2 x 2 patches, so the transformer sees
                  8 x 8 = 64 image tokens of 16 channels
  text_encoder    the Shapes model's scene-coded CLIP (frozen): its pooled output
  text_encoder_2  a small T5 encoder (``T5EncoderModel``) whose tokens are scene-coded the same
                  way (:mod:`engine.shapes.scene_code`), 32 tokens; its tokenizer is a Unigram
                  ``T5TokenizerFast`` whose pieces are the world's words
  transformer     ``FluxTransformer2DModel``: double-stream then single-stream blocks, heads 64
                  wide (RoPE axes 8/28/28), no guidance embedding (schnell-shaped: true CFG)
  scheduler       ``FlowMatchEulerDiscreteScheduler`` (shift 1)
``DiTSizes.smoke()`` is a miniature for tests.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.shapes.world import vocabulary
from engine.tiny import t5_tokenizer

T5_LENGTH = 32  # the longest caption is 28 words; + "</s>"
SHAPES_FOLDER = Path(__file__).parent / "model"  # the VAE and CLIP come from the Shapes model


@dataclass(frozen=True)
class DiTSizes:
    heads: int = 3
    head_dim: int = 64
    double_layers: int = 2
    single_layers: int = 4
    t5_width: int = 128
    t5_layers: int = 2
    t5_heads: int = 2

    @classmethod
    def smoke(cls) -> "DiTSizes":
        return cls(heads=1, head_dim=32, double_layers=1, single_layers=1, t5_width=32, t5_layers=1, t5_heads=1)

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """RoPE axes (text position, row, column) summing to the head width, as FLUX's 16/56/56 of 128."""
        a = self.head_dim // 8
        b = (self.head_dim - a) // 2
        return (a, b, self.head_dim - a - b)

    def to_dict(self) -> dict:
        return asdict(self)


def t5_pieces() -> list[tuple[str, float]]:
    """The T5 tokenizer's pieces besides specials and letters: every world word as one piece (after
    the word boundary "▁") and the comma."""
    return [(f"▁{w}", -1.0) for w in vocabulary()] + [(",", -1.0), ("▁,", -1.0)]


def write_t5_tokenizer(folder: str | Path):
    """A ``T5TokenizerFast`` over :func:`t5_pieces`, saved into ``folder``; returns it."""
    tok = t5_tokenizer(t5_pieces(), T5_LENGTH)
    tok.save_pretrained(str(folder))
    return tok


def fit_vocab(t5, tokenizer) -> None:
    """Give the T5 encoder a row for every id the tokenizer can produce (new rows: the unknown
    token's embedding). A tokenizer whose ids have a gap has more ids than pieces."""
    n, have = len(tokenizer), t5.get_input_embeddings().weight.shape[0]
    if n > have:
        t5.resize_token_embeddings(n)
        with torch.no_grad():
            emb = t5.get_input_embeddings().weight  # [n, D]
            emb[have:] = emb[tokenizer.unk_token_id]


def load_t5_tokenizer(folder: str | Path):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)


def transformer_config(s: DiTSizes, latent_channels: int = 4) -> dict:
    return dict(patch_size=1, in_channels=4 * latent_channels, num_layers=s.double_layers,
                num_single_layers=s.single_layers, attention_head_dim=s.head_dim, num_attention_heads=s.heads,
                joint_attention_dim=s.t5_width, pooled_projection_dim=None, guidance_embeds=False,
                axes_dims_rope=s.rope_axes)


def t5_config(s: DiTSizes, vocab_size: int):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=s.t5_width, d_kv=s.t5_width // s.t5_heads, d_ff=2 * s.t5_width,
                    num_layers=s.t5_layers, num_heads=s.t5_heads, feed_forward_proj="gated-gelu",
                    relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                    is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


@dataclass
class DiTModels:
    vae: torch.nn.Module
    text_encoder: torch.nn.Module  # CLIP (pooled)
    tokenizer: object
    text_encoder_2: torch.nn.Module  # T5 (sequence)
    tokenizer_2: object
    transformer: torch.nn.Module


def build(sizes: DiTSizes, tokenizer_dir: str | Path, shapes: str | Path = SHAPES_FOLDER) -> DiTModels:
    """The VAE and CLIP of the Shapes model (frozen), a fresh T5 and transformer (seed torch first)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel

    shapes = Path(shapes)
    vae = AutoencoderKL.from_pretrained(shapes / "vae")
    vae.register_to_config(shift_factor=0.0)  # FluxPipeline adds it when decoding; the latents are standardised
    clip = CLIPTextModel.from_pretrained(shapes / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(str(shapes / "tokenizer"))
    tok2 = load_t5_tokenizer(tokenizer_dir) if (Path(tokenizer_dir) / "tokenizer.json").is_file() \
        else write_t5_tokenizer(tokenizer_dir)  # a resumed run keeps the vocabulary it trained with
    pooled = clip.config.hidden_size
    cfg = transformer_config(sizes, vae.config.latent_channels)
    cfg["pooled_projection_dim"] = pooled
    return DiTModels(vae=vae.requires_grad_(False), text_encoder=clip.requires_grad_(False), tokenizer=tok,
                     text_encoder_2=T5EncoderModel(t5_config(sizes, len(tok2))), tokenizer_2=tok2,
                     transformer=FluxTransformer2DModel(**cfg))


def save_pipeline(m: DiTModels, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write a diffusers ``FluxPipeline`` folder (safetensors)."""
    from diffusers import FluxPipeline

    def cast(mod):  # a cast copy: the training modules stay fp32
        return mod if next(mod.parameters()).dtype == dtype else copy.deepcopy(mod).to(dtype)

    pipe = FluxPipeline(scheduler=scheduler(), vae=cast(m.vae), text_encoder=cast(m.text_encoder),
                        tokenizer=m.tokenizer, text_encoder_2=cast(m.text_encoder_2), tokenizer_2=m.tokenizer_2,
                        transformer=cast(m.transformer))
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
