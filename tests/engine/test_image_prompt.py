"""IP-Adapter image prompts through the pipeline: loading (file layout, image encoder), generation
against diffusers' pipelines with the same adapter and image embeddings, scale 0, preprocessing."""

import numpy as np
import pytest
import torch

import engine
from engine.images import load_image
from engine.loading.files import LoadError
from engine.tiny import make_tiny_ip_adapter

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def pipes(arch, tiny_sd15_dir, tiny_sdxl_dir):
    folder = tiny_sd15_dir if arch == "sd15" else tiny_sdxl_dir
    cls = diffusers.StableDiffusionPipeline if arch == "sd15" else diffusers.StableDiffusionXLPipeline
    return engine.load(folder), cls.from_pretrained(folder), folder


@pytest.mark.parametrize("kind", ["plain", "plus"])
def test_generate_with_image_prompt_matches_diffusers(pipes, kind, tmp_path):
    ours, ref, _ = pipes
    file = make_tiny_ip_adapter(tmp_path, ours.unet, kind)
    ours.load_ip_adapter(file)
    ref.load_ip_adapter(str(tmp_path), subfolder="models", weight_name=file.name, image_encoder_folder=None)
    try:
        image = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(2))
        emb, null = ours.image_encoder.encode(load_image(image), hidden=kind == "plus")  # what both read
        lat = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
        kw = dict(num_inference_steps=4, guidance_scale=6.0, height=64, width=64, output_type="np")
        want = ref("a red circle", latents=lat.clone(), ip_adapter_image_embeds=[torch.cat([null, emb])[:, None]],
                   **kw).images
        got = ours.generate("a red circle", steps=4, guidance_scale=6.0, height=64, width=64, latents=lat.clone(),
                            ip_adapter_image=image, output_type="np", progress=False)
        assert np.abs(got - want).max() <= 1e-4
        plain = ours.generate("a red circle", steps=4, guidance_scale=6.0, height=64, width=64, latents=lat.clone(),
                              output_type="np", progress=False)
        assert np.abs(plain - want).max() > 1e-3  # the image prompt matters
    finally:
        ref.unload_ip_adapter()
        ours.unload_ip_adapter()


def test_scale_zero_is_bit_identical_and_batches_with_plain_rows(tiny_sd15_dir, tmp_path):
    ours = engine.load(tiny_sd15_dir)
    kw = dict(steps=2, seed=0, output_type="pt", progress=False)
    before = ours.generate("a cat", **kw)
    ours.load_ip_adapter(make_tiny_ip_adapter(tmp_path, ours.unet))
    try:
        image = torch.rand(1, 3, 32, 32)
        zero = ours.generate("a cat", ip_adapter_image=image, ip_adapter_scale=0.0, **kw)
        torch.testing.assert_close(zero, before, rtol=0, atol=0)
        torch.testing.assert_close(ours.generate("a cat", **kw), before, rtol=0, atol=0)
        img_req = dict(prompt="a cat", ip_adapter_image=image, steps=2, seed=0)
        plain_req = dict(prompt="a cat", steps=2, seed=0)
        run = lambda reqs: ours.edit_many(reqs, output_type="pt", batch_invariant=True)  # noqa: E731
        alone, plain = run([img_req])[0], run([plain_req])[0]
        # a request with an image prompt and one without share every model call, each as if alone
        both = run([img_req, plain_req])
        assert ours.last_loop.calls == 2
        torch.testing.assert_close(both[0], alone, rtol=0, atol=0)
        torch.testing.assert_close(both[1], plain, rtol=0, atol=0)
        assert (alone - before).abs().max() > 1e-3
        ours.set_ip_adapter_scale({"mid_block": 1.0})
        a = ours.ip_adapter
        assert [n for n, s in zip(a.names, a.scales) if s] == [n for n in a.names if n.startswith("mid_block.")]
    finally:
        ours.unload_ip_adapter()


def test_preprocessing_matches_clip_image_processor(sd15_pipe, tmp_path):
    """At the encoder's size (no resampling) the crop and normalisation are CLIP's exactly."""
    from transformers import CLIPImageProcessor

    from engine.image_prompt import ImageEncoder

    file = make_tiny_ip_adapter(tmp_path, sd15_pipe.unet)
    folder = file.parent / "image_encoder"
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(folder)
    import json
    enc = ImageEncoder(model, json.loads((folder / "preprocessor_config.json").read_text()))
    pixels = torch.randint(0, 256, (1, 3, 32, 44), generator=torch.Generator().manual_seed(0)).float() / 255
    ref = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    want = torch.as_tensor(np.asarray(ref((pixels[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
                                           return_tensors="np").pixel_values))
    got = enc.preprocess(pixels)
    assert got.shape == (1, 3, 32, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_load_errors(sd15_pipe, tmp_path):
    pipe = engine.load(sd15_pipe.components.root)
    file = make_tiny_ip_adapter(tmp_path, pipe.unet, "plus")
    with pytest.raises(LoadError, match="refuses pickle"):
        bad = tmp_path / "ip-adapter.bin"
        bad.write_bytes(b"x")
        pipe.load_ip_adapter(bad)
    with pytest.raises(LoadError, match="weight_name"):
        pipe.load_ip_adapter(tmp_path)
    lone = tmp_path / "x" / "lone"
    lone.mkdir(parents=True)
    (lone / file.name).write_bytes(file.read_bytes())
    with pytest.raises(LoadError, match="no image encoder given"):
        pipe.load_ip_adapter(lone / file.name)
    plain = make_tiny_ip_adapter(tmp_path / "p", pipe.unet, "plain")
    # the plain adapter takes the 24-wide projection; the plus one's encoder has 32-wide hidden states
    pipe.load_ip_adapter(plain, image_encoder=file.parent / "image_encoder")  # same tiny encoder: fits
    with pytest.raises(ValueError, match="no IP-Adapter loaded"):
        pipe.unload_ip_adapter()
        pipe.set_ip_adapter_scale(0.5)
    with pytest.raises(ValueError, match="needs an IP-Adapter"):
        pipe.invert(torch.rand(1, 3, 32, 32), "x", image_condition=True, steps=2, progress=False)
