"""The CLI's commands. Each checks everything checkable (files, sizes, flags) before loading a
model or computing, then runs the engine and writes its outputs atomically."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .errors import UserError
from engine.methods import (TARGET_FREE, UNSEEDED_INVERSIONS, inversion_for, inversion_prompt, needs_target,
                            split_params)

from .options import EDIT_OPTIONS
from .outputs import check_output, check_output_folder, output_paths, writable_folder

log = logging.getLogger("overpaint")


def _check_device(device: str) -> None:
    from engine.loader import parse_device

    try:
        parse_device(device)
    except ValueError as e:
        raise UserError(str(e).replace("device='cpu'", "--device cpu")) from None


def cmd_tiny(args) -> None:
    from engine.tiny import make_tiny

    folder = Path(args.folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"{folder} exists and is not an empty folder; choose a new folder")
    writable_folder(folder.parent if str(folder.parent) else Path("."), "output")
    from engine.params import seed

    make_tiny(folder, args.arch, seed("--seed", args.seed))
    print(f"wrote a tiny random-weight {args.arch} pipeline to {folder}")


def cmd_generate(args) -> None:
    import engine
    from engine.images import save_image

    if args.alpha and args.chroma_key is None:
        raise UserError("--alpha keys out a chroma background: also give --chroma-key green (or blue, or R,G,B)")
    if args.chroma_direction is not None and args.chroma_key is None:
        raise UserError("--chroma-direction sets how a chroma key shifts the noise: also give --chroma-key")
    if args.alpha and Path(args.output).suffix.lower() not in (".png", ".webp"):
        raise UserError(f"--alpha writes transparency, which {Path(args.output).suffix or 'this format'} cannot "
                        f"hold: write a .png or .webp")
    if (args.controlnet is None) != (args.control_image is None):
        raise UserError("--controlnet and --control-image go together: give both, or neither")
    from engine.images import load_image

    if args.ip_image is not None:
        load_image(args.ip_image)  # a bad image prompt fails before a model loads
    elif args.ip_adapter is not None:
        raise UserError("--ip-adapter needs --ip-image (the image prompt)")
    control = {}
    if args.control_image is not None:
        control = dict(control_image=load_image(args.control_image), controlnet_conditioning_scale=args.control_scale)
    inputs = [Path(f) for f in (args.control_image, args.ip_image) if f is not None]
    outputs = output_paths(args.output, args.num_images, inputs, args.overwrite)
    _check_device(args.device)
    pipe = engine.load(args.model, device=args.device, dtype=args.dtype)
    if args.controlnet is not None:
        pipe.load_controlnet(args.controlnet)
    if args.ip_image is not None:
        _load_adapter(pipe, args)
        control.update(ip_adapter_image=load_image(args.ip_image), ip_adapter_scale=args.ip_scale)
    chroma = {} if args.chroma_key is None else dict(chroma_key=args.chroma_key, chroma_shift=args.chroma_shift,
                                                     chroma_std=args.chroma_std, chroma_center=args.chroma_center,
                                                     chroma_direction=args.chroma_direction, alpha=args.alpha)
    given = {k: v for k, v in (("steps", args.steps), ("guidance_scale", args.guidance),
                               ("guidance_rescale", args.guidance_rescale),
                               ("embedded_guidance", args.embedded_guidance), ("sampler", args.sampler)) if v is not None}
    images = pipe.generate(
        args.prompt, args.negative_prompt, height=args.height, width=args.width, seed=args.seed,
        num_images=args.num_images, progress=not args.no_progress, cuda_graphs=args.cuda_graphs or None,
        **given, **chroma, **control,
    )
    for img, path in zip(images, outputs):
        save_image(img, path)
        print(f"wrote {path}")


def _load_adapter(pipe, args) -> None:
    """The IP-Adapter the command needs: --ip-adapter, else the model's own."""
    if args.ip_adapter is None and not pipe.card.ip_adapter:
        raise UserError("an image condition needs an IP-Adapter: give --ip-adapter FILE (and --image-encoder FOLDER "
                        "unless image_encoder/ sits beside it); this model ships none")
    try:
        pipe.load_ip_adapter(args.ip_adapter, image_encoder=args.image_encoder)
    except ValueError as e:
        raise UserError(f"--ip-adapter: {e}") from None


def _per_concept(values, n: int, flag: str):
    if len(values) == 1:
        return values[0] if n <= 1 else values * n
    if len(values) != n:
        raise UserError(f"{flag} was given {len(values)} times for {n} concepts; give it once or once per concept")
    return values


def method_params(args, inv_method: str) -> tuple[dict, dict]:
    """(inversion params, edit params): only the options the user set, checked against the method."""
    method = args.method
    inv, edit = {"seed": args.seed}, {}
    if args.steps is not None:
        inv["steps"] = args.steps
    concepts = getattr(args, "edit_prompt", None) or ([] if method != "ledits++" or args.target_prompt is None
                                                      else [args.target_prompt])
    for o in EDIT_OPTIONS:
        value = getattr(args, o.dest)
        if value is None or value == []:
            continue
        applies = method in o.methods or (o.stage == "invert" and inv_method in o.methods)  # the inversion made takes it
        if not applies:
            users = ", ".join(o.methods)
            via = f" (whose edit here inverts with {inv_method})" if o.stage == "invert" and inv_method != method else ""
            raise UserError(f"{o.flags[0]} applies to --method {users}, not {method}{via}")
        if o.per_concept:
            value = _per_concept(value, len(concepts), o.flags[0])
        elif o.param == "equalizer":
            value = dict(value)
        elif o.param in ("local_blend_words", "mask_words"):
            value = (value[0].split(), value[1].split())
        elif o.param == "direction":
            value = tuple(value)
        elif o.param == "user_mask":
            value = _mask(value)
        (inv if o.stage == "invert" else edit)[o.param] = value
    inv.pop("method", None)
    if args.keep_size and (args.height or args.width):
        raise UserError("--keep-size processes the image as given and --height/--width resize it: give one of them")
    if args.target_prompt is not None and (getattr(args, "edit_prompt", None) or getattr(args, "direction", None)):
        log.warning("--target-prompt is not used: %s gives the edit",
                    "--edit-prompt" if getattr(args, "edit_prompt", None) else "--direction")
    if method == "ledits++":
        if not concepts:
            raise UserError("--method ledits++ needs --edit-prompt (a concept to add, or to remove with --reverse) "
                            "or --target-prompt")
        edit["editing_prompt"] = concepts
    elif args.target_prompt is None and needs_target(method, edit):
        alt = " or --direction" if method in TARGET_FREE else ""
        raise UserError(f"--method {method} needs --target-prompt (the caption of the edited image){alt}")
    return split_params(method, inv, edit)


def _mask(path: str):
    """A mask image -> [1, 1, H, W] in [0, 1] (resized to the latents once they exist)."""
    from engine.images import load_image

    return load_image(path).mean(dim=1, keepdim=True)  # [1, 1, H, W]


def _latent_mask(mask, inv):
    """The --mask at the inversion's latent size: [1, 1, h, w]."""
    import torch

    return torch.nn.functional.interpolate(mask, size=tuple(inv.x0.shape[-2:]), mode="area").to(inv.x0.device)


def _inversion_method(args, card) -> str:
    if getattr(args, "invert_with", None):
        return args.invert_with
    return inversion_for(args.method, card)


def _image_size(pipe, x, args) -> tuple[int, int] | None:
    """The size to process the image at (None: as given), with a notice when it is resized."""
    h, w = x.shape[-2:]
    if args.height and args.width:
        return args.height, args.width
    if args.height or args.width:  # one side given: the other keeps the aspect, on the sides the model takes
        m = pipe.size_step
        if args.height:
            return args.height, max(m, round(w * args.height / h / m) * m)
        return max(m, round(h * args.width / w / m) * m), args.width
    if args.keep_size:
        return None
    size = pipe.fit_size(h, w)
    if size is not None:
        log.warning("resizing the %dx%d image to %dx%d, this model's size (--keep-size processes it as given%s)",
                    w, h, size[1], size[0], "" if args.output_size == "input" else
                    "; --output-size input writes the result at the input's size")
    return size


def _check_family(method: str, root: Path) -> None:
    """A method of another model family fails before the weights load (read from model_index.json)."""
    from engine.loading.files import read_json
    from engine.loading.flux import is_flux
    from engine.methods import check_family

    try:
        check_family(method, "flux" if is_flux(read_json(root / "model_index.json", "model_index")) else "unet")
    except ValueError as e:
        raise UserError(str(e).replace("edit method", "--method")) from None


def _invert_request(args, image_sha: str, inv_method: str, inv_params: dict) -> dict:
    """What this command asks of the inversion (recorded with a saved one, checked on reuse);
    the size it is processed at ("size") is added and checked once the model is read."""
    request = {"image_sha256": image_sha, "method": inv_method,
               "prompt": inversion_prompt(args.method, args.source_prompt, args.target_prompt), **inv_params}
    if inv_method in UNSEEDED_INVERSIONS:
        request.pop("seed", None)  # it draws nothing: any seed makes the same inversion
    return json.loads(json.dumps(request, default=str))  # as it reads back from the file


def _check_loaded(inv, inv_file: Path, image: Path, asked: dict) -> None:
    """An existing --inversion FILE is edited as it is: it must come from IMAGE, made the way
    this command would make it (else the options would be silently ignored)."""
    made = inv.settings.get("cli_request")
    if made is None:
        log.warning("%s does not record how it was made; editing it as the inversion of %s", inv_file, image)
        return
    if made.get("image_sha256") != asked["image_sha256"]:
        raise UserError(f"--inversion {str(inv_file)!r} was made from another image than {str(image)!r}; give that "
                        f"image, or a new --inversion path to invert this one")
    for k in sorted((set(made) | set(asked)) - {"size", "height", "width", "keep_size"}):  # sizes: after loading
        if made.get(k) != asked.get(k):
            raise UserError(f"--inversion {str(inv_file)!r} was made with {k}={made.get(k)!r} and this command asks "
                            f"for {asked.get(k)!r}; match it, or give a new --inversion path")


def cmd_edit(args) -> None:
    import engine
    from engine.editing import Inversion
    from engine.images import load_image, parse_background, resize, save_image, to_output
    from engine.loader import resolve
    from engine.loading.card import ModelCard

    image = Path(args.image)
    inv_file = Path(args.inversion) if args.inversion else None
    inputs = [image] + [Path(f) for f in (args.inversion, getattr(args, "mask", None)) if f]
    out = check_output(args.output, inputs, overwrite=args.overwrite)
    if inv_file is not None and not inv_file.exists():
        check_output(args.inversion, [image, out], suffixes=(".safetensors",), what="--inversion")
    try:
        parse_background(args.background)
    except ValueError as e:
        raise UserError(f"--background: {e}") from None
    # Everything that can fail on what the user gave fails here, before a model loads.
    x = load_image(image, background=args.background)  # [1, 3, H, W]
    input_size = tuple(x.shape[-2:])
    inv = Inversion.load(inv_file) if inv_file is not None and inv_file.exists() else None  # checksum verified
    root = resolve(args.model)
    card = ModelCard.read(root)
    _check_family(args.method, root)
    inv_method = inv.method if inv is not None else _inversion_method(args, card)
    inv_params, edit_params = method_params(args, inv_method)
    asked = _invert_request(args, hashlib.sha256(image.read_bytes()).hexdigest(), inv_method, inv_params)
    if inv is not None:
        _check_loaded(inv, inv_file, image, asked)
    _check_device(args.device)
    pipe = engine.load(args.model, device=args.device, dtype=args.dtype)
    progress = not args.no_progress
    graphs = args.cuda_graphs or None
    if args.ip_adapter is not None or "image_scale" in inv_params or (inv is not None and inv.image_prompt() is not None):
        _load_adapter(pipe, args)
    size = _image_size(pipe, x, args) or tuple(x.shape[-2:])
    if inv is not None:
        inv.check_model(pipe.identity, pipe.name)
        made = inv.settings.get("cli_request", {}).get("size")
        if made is not None and tuple(made) != tuple(size):
            raise UserError(f"--inversion {str(inv_file)!r} was made at {made[1]}x{made[0]} and this command "
                            f"processes the image at {size[1]}x{size[0]}; match the size flags, or give a new "
                            f"--inversion path")
        print(f"loaded inversion {inv_file}")
    else:
        asked["size"] = list(size)
        x = resize(x, *size)
        prompt = inversion_prompt(args.method, args.source_prompt, args.target_prompt)
        inv = pipe.invert(x, prompt, method=inv_method, progress=progress, cuda_graphs=graphs, **inv_params)
        inv.settings["cli_request"] = asked  # a later --inversion FILE is checked against it
        if inv_file is not None:
            inv.save(inv_file)
            print(f"saved inversion to {inv_file}")
    if "user_mask" in edit_params:
        edit_params["user_mask"] = _latent_mask(edit_params["user_mask"], inv)
    target = args.target_prompt if needs_target(args.method, edit_params) else None
    edited = pipe.edit(inv, args.method, target, output_type="pt", progress=progress, cuda_graphs=graphs,
                       **edit_params)  # [1, 3, h, w]
    if args.output_size == "input":
        edited = resize(edited, *input_size)
    save_image(to_output(edited)[0], out)
    print(f"wrote {out}")


def cmd_demo(args) -> None:
    from engine.shapes.demo import run

    folder = check_output_folder(args.output, [])
    res = run(folder, model=args.model)
    print(f"{res['method']}: {res['source_prompt']!r} -> {res['target_prompt']!r} in {res['seconds']} s")
    for name, path in res["paths"].items():
        print(f"wrote {path}" + (f"  (reads: {res['seen'][name]})" if name in res["seen"] else ""))


def cmd_vocab(args) -> None:
    from engine.loader import resolve
    from engine.loading.card import ModelCard

    card = ModelCard.read(resolve(args.model))
    if card.vocabulary is None:
        print(f"{args.model} declares no vocabulary: its text encoder takes any text")
        return
    print(f"{args.model} knows {len(card.vocabulary)} words:")
    print(" ".join(card.vocabulary))


def cmd_serve(args) -> None:
    import os

    from engine.serving.api import ServeSettings
    from engine.serving.server import check_host

    key = args.api_key or os.environ.get("OVERPAINT_API_KEY") or None
    try:
        check_host(args.host, key, args.insecure)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.cache_dir:
        check_output_folder(args.cache_dir, [])
    _check_device(args.device)
    settings = ServeSettings(model=args.model, device=args.device, dtype=args.dtype, cuda_graphs=args.cuda_graphs,
                             max_batch_rows=args.max_batch_rows, max_queue=args.max_queue,
                             max_body_bytes=args.max_body_bytes, timeout=args.timeout, cache_bytes=args.cache_bytes,
                             cache_dir=args.cache_dir, api_key=key, batch_invariant=args.batch_invariant,
                             grace_s=args.grace, ip_adapter=args.ip_adapter, image_encoder=args.image_encoder)
    if args.ray:
        from engine.serving.ray_app import serve_ray

        serve_ray(settings, host=args.host, port=args.port, replicas=args.replicas)
        return
    from engine.serving.server import serve

    serve(settings, host=args.host, port=args.port, insecure=args.insecure)
