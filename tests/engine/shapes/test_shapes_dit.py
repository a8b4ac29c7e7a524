"""The Shapes DiT: its trainer (smoke), its folder in diffusers' FluxPipeline and in ours, resume."""

import json

import pytest
import torch

from engine.shapes import dit, world
from engine.shapes import train_dit as T

CAPTION = "a small red circle on the left and a large blue square on the right, on a white background"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("dit") / "run"
    export = out.parent / "export"
    T.main(["--out", str(out), "--smoke", "--export", str(export), "--no-progress"])
    return out, export


def test_t5_tokenizer_has_one_token_per_word(tmp_path):
    tok = dit.write_t5_tokenizer(tmp_path)
    ids = tok(CAPTION).input_ids
    assert len(ids) == len(world.words(CAPTION)) + 1 and ids[-1] == tok.eos_token_id  # words, ",", "</s>"
    assert tok.unk_token_id not in ids
    assert len(tok("a purple hexagon").input_ids) > 3  # unknown words still tokenize (letters)


def test_folder_loads_in_diffusers_and_ours_and_they_agree(trained):
    from diffusers import FluxPipeline

    import engine

    _, export = trained
    theirs = FluxPipeline.from_pretrained(str(export))
    ours = engine.load(str(export))
    assert ours.arch == "flux" and ours.default_size == 64 and ours.max_sequence_length == dit.T5_LENGTH
    card = json.loads((export / "overpaint.json").read_text())
    assert set(card["invert"]) == {"flow", "rf-inversion"} and card["generate"]["steps"] == 28
    want = theirs(CAPTION, negative_prompt="", true_cfg_scale=4.0, num_inference_steps=3, height=64, width=64,
                  max_sequence_length=dit.T5_LENGTH, generator=torch.Generator().manual_seed(0), output_type="pt").images
    got = ours.generate(CAPTION, steps=3, guidance_scale=4.0, seed=0, output_type="pt", progress=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_log_checkpoint_and_resume(trained, tmp_path):
    out, _ = trained
    rows = (out / "train_log.csv").read_text().splitlines()
    assert rows[0] == "stage,step,loss,lr,elapsed_s" and any(r.startswith("dit,6,") for r in rows)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["dit_steps"] == 6 and 0 <= summary["t5_code_accuracy"] <= 1
    # a run stopped at 3 steps and resumed to 6 ends with the same transformer as the straight run
    half = tmp_path / "half"
    T.main(["--out", str(half), "--smoke", "--steps", "3", "--no-progress"])
    T.main(["--out", str(half), "--smoke", "--resume", "--no-progress"])
    from safetensors.torch import load_file

    a = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(half / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_vocab_adds_rows_for_ids_past_the_embedding(tmp_path):
    from transformers import T5EncoderModel

    tok = dit.write_t5_tokenizer(tmp_path)
    t5 = T5EncoderModel(dit.t5_config(dit.DiTSizes.smoke(), len(tok) - 2))
    dit.fit_vocab(t5, tok)
    emb = t5.get_input_embeddings().weight
    assert emb.shape[0] == len(tok)
    torch.testing.assert_close(emb[-1], emb[tok.unk_token_id], rtol=0, atol=0)

