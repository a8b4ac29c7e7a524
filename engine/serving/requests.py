"""From HTTP fields to jobs: every field checked and named in the error, images checked from
their header before decoding, edits split into an (optionally cached) inversion and an edit."""

from __future__ import annotations

import base64
import binascii
import json

from ..methods import (DEFAULT_INVERSION, EDIT_SHARES, EDIT_TAKES, UNSEEDED_INVERSIONS, inversion_for,
                       inversion_prompt, needs_target, split_params)
from .cache import inversion_id
from .jobs import PREVIOUS, ApiError, Job, Stage, bad_request

# HTTP name -> the inversion's parameter
INVERT_FIELDS = {"steps": "steps", "seed": "seed", "skip": "skip", "inversion_guidance_scale": "guidance_scale",
                 "inversion_sampler": "sampler", "inversion_method": "method", "inner_steps": "inner_steps",
                 "early_stop": "early_stop", "lambda_ac": "lambda_ac", "lambda_kl": "lambda_kl",
                 "embed_steps": "embed_steps", "embed_lr": "embed_lr", "tune_steps": "tune_steps", "tune": "tune",
                 "tune_lr": "tune_lr", "lora_rank": "lora_rank", "gamma": "gamma",
                 "inversion_embedded_guidance": "embedded_guidance", "renoise_steps": "renoise_steps",
                 "noise_correction": "noise_correction",
                 "image_scale": "image_scale"}
EDIT_FIELDS = {
    "*": {"guidance_scale", "negative_prompt"},
    "ledits++": {"editing_prompt", "edit_guidance_scale", "edit_threshold", "edit_warmup_steps", "edit_cooldown_steps",
                 "reverse_editing_direction", "use_cross_attn_mask", "use_intersect_mask", "guidance_rescale"},
    "p2p": {"cross_replace_steps", "self_replace_steps", "edit_type", "equalizer", "local_blend_words",
            "blend_threshold", "blend_start", "blend_resolution", "blend_maps", "source_guidance_scale", "source",
            "self_replace_max_queries", "self_replace_min_scale"},
    "pnp": {"pnp_attn_t", "pnp_f_t"},
    "masactrl": {"start_step", "start_layer", "end_step", "end_layer", "mask_words", "mask_threshold",
                 "source_guidance_scale", "source"},
    "pix2pix-zero": {"direction", "cross_attention_guidance"},
    "imagic": {"alpha", "sampler", "eta"},
    "flow": {"embedded_guidance"},
    "rf-inversion": {"eta", "start", "stop", "decay_eta", "eta_decay_power", "embedded_guidance"},
}
GENERATE_FIELDS = {"steps", "seed", "guidance_scale", "negative_prompt", "sampler", "guidance_rescale", "eta",
                   "chroma_key", "chroma_shift", "chroma_std", "chroma_center", "chroma_direction", "embedded_guidance"}
OPENAI_IGNORED = {"model", "user", "response_format", "n", "size", "quality", "style", "background", "moderation",
                  "output_format", "output_compression", "input_fidelity", "partial_images", "stream"}
MAX_N = 8


def text(fields: dict, name: str, required: bool = False, default: str | None = None, limit: int = 2000) -> str | None:
    v = fields.get(name, default)
    if v is None:
        if required:
            raise bad_request(f"'{name}' is required", name, "missing_field")
        return None
    if not isinstance(v, str):
        raise bad_request(f"'{name}' must be a string", name)
    if len(v) > limit:
        raise bad_request(f"'{name}' is {len(v)} characters; at most {limit}", name)
    return v


def integer(fields: dict, name: str, default: int, lo: int, hi: int) -> int:
    """An integer field (a form's text or JSON's number), checked by :func:`engine.params.integer`."""
    from .. import params

    try:
        return params.integer(name, form_value(fields.get(name, default)), lo, hi)
    except ValueError as e:
        raise bad_request(str(e), name) from None


def size(fields: dict, name: str = "size") -> tuple[int, int] | None:
    """OpenAI's "WIDTHxHEIGHT" (or "auto"/absent: the model's) -> (height, width)."""
    v = fields.get(name)
    if v in (None, "", "auto"):
        return None
    try:
        w, h = (int(p) for p in str(v).lower().split("x"))
    except ValueError:
        raise bad_request(f"'{name}' must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {v!r}", name) from None
    if not (8 <= w <= 4096 and 8 <= h <= 4096):
        raise bad_request(f"'{name}' sides must be from 8 to 4096, got {v!r}", name)
    return h, w


def form_value(v):
    """A multipart field's value: JSON (numbers, booleans, lists, objects) where it parses, else the text."""
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except ValueError:
        return v


def b64_image(fields: dict, name: str = "image") -> bytes:
    v = text(fields, name, required=True, limit=1 << 30)
    if v.startswith("data:"):
        v = v.partition(",")[2]
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"'{name}' must be a base64-encoded image", name) from None


def decode_image(data: bytes, max_pixels: int):
    """Image bytes -> [1, 3, H, W]; 413 over the pixel limit (read from the header), 400 if unreadable."""
    from ..images import ImageTooLarge, load_image

    try:
        return load_image(data, max_pixels=max_pixels)
    except ImageTooLarge as e:
        raise ApiError(413, str(e), "invalid_request_error", "image", "image_too_large") from None
    except ValueError as e:
        raise bad_request(str(e), "image", "invalid_image") from None


def method_params(fields: dict, method: str, extra_ok: set[str]) -> tuple[dict, dict]:
    """(inversion params, edit params) from the request's extension fields; unknown fields are 400s."""
    inv, edit = {}, {}
    allowed = EDIT_FIELDS["*"] | EDIT_FIELDS.get(method, set())
    for k, v in fields.items():
        if k in extra_ok or k in OPENAI_IGNORED:
            continue
        v = form_value(v)
        if k in INVERT_FIELDS:
            inv[INVERT_FIELDS[k]] = v
        elif k in allowed:
            edit[k] = tuple(v) if k in ("local_blend_words", "mask_words", "direction") and isinstance(v, list) else v
        else:
            known = sorted(set(INVERT_FIELDS) | allowed)
            raise bad_request(f"unknown parameter '{k}' for method '{method}'; known: {', '.join(known)}", k,
                              "unknown_parameter")
    if "method" in inv and (method != "p2p" or inv["method"] not in ("ddim", "ddpm", "null-text")):
        raise bad_request("'inversion_method' applies to method 'p2p' and is 'ddim', 'ddpm' or 'null-text'",
                          "inversion_method")
    return split_params(method, inv, edit)


def openai_options(fields: dict, route: str) -> tuple[str, int | None]:
    """OpenAI's output options on the image routes: (output_format, quality for JPEG / WebP);
    400 for what this server does not do (URLs, streamed partial images, a transparent edit)."""
    if (fields.get("response_format") or "b64_json") != "b64_json":
        raise bad_request("only response_format=b64_json is served (no URLs)", "response_format")
    stream = form_value(fields.get("stream"))
    if stream not in (None, False, 0, "") and str(stream).lower() not in ("false", "0"):
        raise bad_request("streamed responses are not served here; send stream=false (POST /v1/edits and "
                          "GET /v1/jobs/{id}/events report progress)", "stream")
    if fields.get("partial_images") is not None and integer(fields, "partial_images", 0, 0, 3):
        raise bad_request("partial_images needs a streamed response, which is not served; send 0", "partial_images")
    fmt = text(fields, "output_format") or "png"  # absent or null: OpenAI's default
    if fmt not in ("png", "jpeg", "webp"):
        raise bad_request(f"'output_format' must be 'png', 'jpeg' or 'webp', got {fmt!r}", "output_format")
    quality = 100  # OpenAI's default; its compression applies to JPEG and WebP
    if fields.get("output_compression") is not None:
        quality = integer(fields, "output_compression", 100, 0, 100)
    quality = None if fmt == "png" else quality
    background = text(fields, "background") or "auto"
    if background not in ("auto", "opaque", "transparent"):
        raise bad_request(f"'background' must be 'transparent', 'opaque' or 'auto', got {background!r}", "background")
    if background == "transparent" and route == "edits":
        raise bad_request("an edit keeps the image's own background: send background='auto' (transparent "
                          "backgrounds are for generations with a chroma_key)", "background")
    if background == "transparent" and fmt == "jpeg":
        raise bad_request("JPEG has no alpha channel: use output_format 'png' or 'webp' for a transparent background",
                          "output_format")
    return fmt, quality


def unseeded(fields: dict, card) -> str | None:
    """Why the seed cannot change an edit with these fields (every one of ``n`` images would be
    the same), or None: its inversion draws noise (unless a made one is given by id), or the
    edit itself reads the seed (Imagic's generation)."""
    method = fields.get("method", "p2p")
    if method not in DEFAULT_INVERSION:
        return None  # edit_job names the unknown method
    if "seed" in EDIT_TAKES.get(method, ()) + EDIT_SHARES.get(method, ()):
        return None  # the edit reads the seed itself
    inv = form_value(fields.get("inversion_method")) or inversion_for(method, card)
    if inv in UNSEEDED_INVERSIONS:
        return f"method '{method}' inverts with {inv}, which draws no noise; pick ddpm or ledits++"
    if fields.get("inversion") is not None:
        return (f"a given inversion is fixed and the '{method}' edit draws no noise; send the image instead of "
                f"'inversion'")
    return None


def edit_job(server, fields: dict, image: bytes | None, route: str) -> Job:
    """The job of an edit: the inversion (from the cache, or a stage that fills it) and the edit."""
    method = text(fields, "method", default="p2p")
    if method not in DEFAULT_INVERSION:
        raise bad_request(f"unknown method {method!r}; use one of {', '.join(DEFAULT_INVERSION)}", "method")
    source = text(fields, "source_prompt", default="")
    target = text(fields, "prompt" if "prompt" in fields else "target_prompt")
    inv_params, edit_params = method_params(fields, method, {"image", "prompt", "target_prompt", "source_prompt",
                                                             "method", "inversion"})
    if method == "ledits++" and not edit_params.get("editing_prompt") and target is None:
        raise bad_request("ledits++ needs 'prompt' (or 'editing_prompt': concepts to add)", "prompt", "missing_field")
    if target is None and needs_target(method, edit_params):
        raise bad_request("'prompt' (the caption of the edited image) is required", "prompt", "missing_field")
    if method == "ledits++" and not edit_params.get("editing_prompt"):
        edit_params["editing_prompt"] = [target]
    source = inversion_prompt(method, source, target)  # Imagic inverts for the edit's own text
    target = target if needs_target(method, edit_params) else None
    inv_method = inv_params.pop("method", None) or inversion_for(method, server.model.card)
    inv_id = text(fields, "inversion")
    stages = []
    if inv_id is not None:
        inv = server.cache.get(inv_id)
        if inv is None:
            raise ApiError(404, f"no inversion {inv_id!r} (expired or never made); POST /v1/inversions first",
                           "invalid_request_error", "inversion", "not_found")
        server.metrics.cache.labels("hit").inc()
    else:
        if image is None:
            raise bad_request("give 'image' or 'inversion' (an id from POST /v1/inversions)", "image", "missing_field")
        _, inv, stage = inversion_stage(server, image, source, inv_method, inv_params)
        if stage is not None:
            stages.append(stage)
    stages.append(Stage("edit", {"inv": inv if not stages else PREVIOUS, "method": method, "target_prompt": target,
                                 **edit_params}))
    return Job(stages, route=route, method=method, timeout=server.settings.timeout)


def inversion_stage(server, image: bytes, prompt: str, method: str, params: dict):
    """(cache id, the cached inversion or None, else a stage that inverts and caches it)."""
    x = decode_image(image, server.settings.max_pixels)  # [1, 3, H, W]
    fit = server.model.fit_size(*x.shape[-2:])
    if fit is not None:
        from ..images import resize

        x = resize(x, *fit)
    key = inversion_id(image, {"prompt": prompt, "method": method, **params}, server.model.identity)
    inv = server.cache.get(key)
    server.metrics.cache.labels("hit" if inv is not None else "miss").inc()
    if inv is not None:
        return key, inv, None
    stage = Stage("invert", {"image": x, "prompt": prompt, "method": method, **params},
                  on_result=lambda result: server.cache.put(key, result))
    return key, None, stage


def generation_job(server, fields: dict) -> Job:
    prompt = text(fields, "prompt", required=True)
    n = integer(fields, "n", 1, 1, MAX_N)
    hw = size(fields)
    params = {}
    background = text(fields, "background") or "auto"  # OpenAI's: checked by openai_options
    if background == "transparent":
        if fields.get("chroma_key") is None:
            raise bad_request("background='transparent' keys out a chroma background: also give chroma_key "
                              "('green', 'blue' or [r, g, b])", "background")
        params["alpha"] = True
    for k, v in fields.items():
        if k in ("prompt",) or k in OPENAI_IGNORED:
            continue
        if k not in GENERATE_FIELDS:
            raise bad_request(f"unknown parameter '{k}'; known: {', '.join(sorted(GENERATE_FIELDS))}", k,
                              "unknown_parameter")
        v = form_value(v)
        params[k] = tuple(v) if k in ("chroma_key", "chroma_center") and isinstance(v, list) else v
    if hw is not None:
        params["height"], params["width"] = hw
    return Job([Stage("generate", {"prompt": prompt, "num_images": n, **params})], route="generations",
               method="generate", timeout=server.settings.timeout)
