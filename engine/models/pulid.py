"""PuLID for FLUX (Guo et al. 2024, "PuLID: Pure and Lightning ID Customization via Contrastive
Alignment"; the official FLUX code, ToTheBeginning/PuLID, v0.9.x): identity tokens from a face,
added to FLUX's image tokens by small cross-attention modules between blocks.

* :class:`IDFormer` turns the face's id condition (ArcFace embedding ++ EVA-CLIP's normalised
  class embedding, [B, 1280]) and five EVA-CLIP hidden states ([B, 577, 1024] each) into 32 id
  tokens [B, 32, 2048]: 5 id tokens from a mapping of the condition join 32 learned queries,
  and two perceiver blocks per hidden state read [id tokens; mapped hidden state].
* :class:`PerceiverAttentionCA` (dim 3072, 16 heads of 128, keys/values from the id tokens only):
  after double block i (every ``double_interval``-th, from 0) and after single block i (every
  ``single_interval``-th) the image tokens take ``img + id_weight · ca(id, img)``.

The modules keep the published names (``pulid_encoder.*``, ``pulid_ca.{n}.*`` of
``pulid_flux_v0.9.1.safetensors``; :func:`from_state_dict` infers every width from the tensors).
The injection is an instruction in the plan (:class:`PuLIDPlan` answers ``block_residual``),
never a hook on the transformer: a row at id weight 0 keeps exactly the plain FLUX tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import PlanOverlay
from .ip_adapter import PerceiverAttention, _feed_forward

CA_HEAD_DIM = 128  # the official PerceiverAttentionCA's head width (heads = inner width / 128)


def _mapping(din: int, dim: int, dout: int) -> nn.Sequential:
    # Indices as the published files: Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU, Linear.
    return nn.Sequential(nn.Linear(din, dim), nn.LayerNorm(dim), nn.LeakyReLU(), nn.Linear(dim, dim),
                         nn.LayerNorm(dim), nn.LeakyReLU(), nn.Linear(dim, dout))


class IDFormer(nn.Module):
    """Id condition [B, C_id] and ``scales`` hidden states [B, N, C_vit] -> id tokens [B, Q, C_out]."""

    def __init__(self, dim: int = 1024, depth: int = 10, heads: int = 16, id_tokens: int = 5, queries: int = 32,
                 out_dim: int = 2048, id_dim: int = 1280, vit_dim: int = 1024, scales: int = 5):
        super().__init__()
        self.id_tokens, self.queries, self.per_scale = id_tokens, queries, depth // scales
        self.latents = nn.Parameter(torch.randn(1, queries, dim) * dim**-0.5)
        self.proj_out = nn.Parameter(torch.randn(dim, out_dim) * dim**-0.5)  # used as latents @ proj_out
        self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(dim, heads), _feed_forward(dim)])
                                     for _ in range(depth)])
        for i in range(scales):
            setattr(self, f"mapping_{i}", _mapping(vit_dim, dim, dim))
        self.id_embedding_mapping = _mapping(id_dim, dim, dim * id_tokens)
        self.scales = scales

    def forward(self, id_cond: Tensor, hidden: list[Tensor]) -> Tensor:
        b = id_cond.shape[0]
        dt = self.latents.dtype
        x = self.id_embedding_mapping(id_cond.to(dt)).reshape(b, self.id_tokens, -1)  # [B, 5, dim]
        latents = torch.cat([self.latents.expand(b, -1, -1), x], dim=1)  # [B, Q+5, dim]
        for i in range(self.scales):
            ctx = torch.cat([x, getattr(self, f"mapping_{i}")(hidden[i].to(dt))], dim=1)  # [B, 5+N, dim]
            for attn, ff in self.layers[i * self.per_scale:(i + 1) * self.per_scale]:
                latents = attn(ctx, latents) + latents
                latents = ff(latents) + latents
        return latents[:, :self.queries] @ self.proj_out  # [B, Q, out]


class PerceiverAttentionCA(nn.Module):
    """Image tokens [B, L, dim] attend to id tokens [B, Q, kv_dim] -> [B, L, dim] (no residual)."""

    def __init__(self, dim: int = 3072, kv_dim: int = 2048, heads: int = 16, head_dim: int = CA_HEAD_DIM):
        super().__init__()
        self.heads, inner = heads, heads * head_dim
        self.norm1, self.norm2 = nn.LayerNorm(kv_dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def kv(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the id tokens [B, Q, kv_dim] -> [B, H, Q, D] each (once per call)."""
        b, q, _ = ids.shape
        k, v = self.to_kv(self.norm1(ids)).view(b, q, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, img: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, n, _ = img.shape
        q = self.to_q(self.norm2(img)).view(b, n, self.heads, -1).transpose(1, 2)  # [B, H, L, D]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, D]; softmax(q k^T / sqrt(D)) as the official
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


@dataclass
class PuLIDPlan(PlanOverlay):
    """A plan plus PuLID's residuals after the blocks it names."""

    residuals: dict = None  # (block kind, index) -> (ca module, k [R, H, Q, D], v, weight [R] float32)

    def block_residual(self, kind: str, i: int, img: Tensor) -> Tensor:
        """Image tokens [R, N, dim] after block i of ``kind`` ("double" / "single")."""
        r = self.residuals.get((kind, i))
        if r is None:
            return img
        ca, k, v, w = r
        return img + w.to(img.dtype).view(-1, 1, 1) * ca(img, k, v)


class PuLID(nn.Module):
    """The id encoder and the cross-attention modules for one FLUX transformer."""

    def __init__(self, encoder: IDFormer, ca: nn.ModuleList, double: int, single: int,
                 double_interval: int = 2, single_interval: int = 4):
        super().__init__()
        self.pulid_encoder, self.pulid_ca = encoder, ca
        self.sites = [("double", i) for i in range(0, double, double_interval)] + \
                     [("single", i) for i in range(0, single, single_interval)]
        if len(self.sites) != len(ca):
            raise ValueError(f"the PuLID file has {len(ca)} cross-attention modules but this FLUX transformer has "
                             f"{len(self.sites)} places for them ({double} double and {single} single blocks): "
                             f"it was made for another model")

    @property
    def tokens(self) -> int:
        return self.pulid_encoder.queries

    @property
    def token_dim(self) -> int:
        return self.pulid_encoder.proj_out.shape[1]

    def encode(self, id_cond: Tensor, hidden: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(id tokens of the faces, id tokens of the null face: the encoder on zeros, as the official
        negative branch) [B, Q, C] each."""
        tokens = self.pulid_encoder(id_cond, hidden)
        null = self.pulid_encoder(torch.zeros_like(id_cond), [torch.zeros_like(h) for h in hidden])
        return tokens, null

    def plan(self, tokens: Tensor, scale: Tensor, base=None) -> PuLIDPlan:
        """Instructions for rows whose id tokens are ``tokens`` [R, Q, C] at per-row id weight ``scale`` [R]."""
        w = scale.to(torch.float32)
        res = {}
        for site, ca in zip(self.sites, self.pulid_ca):
            k, v = ca.kv(tokens.to(ca.to_kv.weight.dtype))
            res[site] = (ca, k, v, w)
        return PuLIDPlan(base, res)


def from_state_dict(transformer, state: dict[str, Tensor]) -> PuLID:
    """The PuLID a published file describes (``pulid_encoder.*``, ``pulid_ca.{n}.*``), sized from its
    tensors, for ``transformer``; ValueError naming what does not fit."""
    enc = {k.removeprefix("pulid_encoder."): v for k, v in state.items() if k.startswith("pulid_encoder.")}
    cas = {k.removeprefix("pulid_ca."): v for k, v in state.items() if k.startswith("pulid_ca.")}
    if not enc or not cas:
        raise ValueError("not a PuLID file: it needs pulid_encoder.* and pulid_ca.* tensors")
    _, queries, dim = enc["latents"].shape
    scales = sum(1 for k in enc if k.startswith("mapping_") and k.endswith(".0.weight"))
    depth = 1 + max(int(k.split(".")[1]) for k in enc if k.startswith("layers."))
    encoder = IDFormer(dim, depth, enc["layers.0.0.to_q.weight"].shape[0] // 64,
                       enc["id_embedding_mapping.6.weight"].shape[0] // dim, queries, enc["proj_out"].shape[1],
                       enc["id_embedding_mapping.0.weight"].shape[1], enc["mapping_0.0.weight"].shape[1], scales)
    n = 1 + max(int(k.split(".")[0]) for k in cas)
    q = cas["0.to_q.weight"]  # [inner, dim]
    model_dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if q.shape[1] != model_dim:
        raise ValueError(f"this PuLID attends from {q.shape[1]}-wide image tokens but the FLUX transformer's are "
                         f"{model_dim}: it was made for another model")
    ca = nn.ModuleList([PerceiverAttentionCA(q.shape[1], cas["0.to_kv.weight"].shape[1], q.shape[0] // CA_HEAD_DIM)
                        for _ in range(n)])
    c = transformer.config
    pulid = PuLID(encoder, ca, c.num_layers, c.num_single_layers)
    try:
        pulid.pulid_encoder.load_state_dict(enc, strict=True)
        pulid.pulid_ca.load_state_dict(cas, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the PuLID file's tensors do not fit: {e}") from None
    return pulid.to(transformer.device, transformer.dtype).eval().requires_grad_(False)
