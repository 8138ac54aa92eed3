"""Text-conditional models (issue 28): captions in both conventions and their one-line errors,
byte tokens, the condition-source seam, and real tiny runs on the handwritten digits written as
a captioned folder ("a handwritten seven"), whose samples are read by the digits classifier: a
prompt's digit is a known answer for whether the caption reaches the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_conditional import BACKBONES, Collapsed, trained_on_null
from test_faults import BASE, raised
from test_kill_points import STEPS, assert_same_end
from test_kill_points import run as run_cli

from ldmkit.cli import main
from ldmkit.conditioning.sources import (
    ClassSource,
    TextSource,
    read_prompts,
    source_of,
    training_prompts,
)
from ldmkit.config import DataConfig, from_dict
from ldmkit.data.captions import read_captions
from ldmkit.data.sources import list_folder, load_data, source_digest
from ldmkit.diffusion.condition import LABELS, TOKENS
from ldmkit.errors import ConfigError, DataError, LdmkitError
from ldmkit.models.layers import largest_attention_logit
from ldmkit.models.registry import build_backbone
from ldmkit.models.text import PAD, CrossAttention, Text, tokenize
from ldmkit.run.context import diagnose_path
from ldmkit.run.layout import RunDir
from ldmkit.sampling.classifier import load_or_train
from ldmkit.sampling.contrastive import load_or_train_image_text, split_captioned
from ldmkit.sampling.generate import generate, sampling_request
from ldmkit.sampling.trained import load_for_sampling
from ldmkit.training.loop import train
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.logs.metrics_jsonl import MetricLogger

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_folder(root: Path, count: int = 512, convention: str = "jsonl") -> Path:
    """The first ``count`` scikit-learn digits as 16x16 PNGs, captioned "a handwritten seven"
    (every other one "seven, handwritten": the words, not one fixed string, carry the digit)
    in ``metadata.jsonl`` or in a ``.txt`` beside each image."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    root.mkdir(parents=True)
    lines = []
    for i in range(count):
        pixels = (bunch.images[i] * (255 / 16)).round().astype(np.uint8)
        Image.fromarray(pixels).resize((16, 16), Image.Resampling.BILINEAR).save(
            root / f"{i:04d}.png")
        word = WORDS[bunch.target[i]]
        caption = f"a handwritten {word}" if i % 2 else f"{word}, handwritten"
        if convention == "jsonl":
            lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": caption}))
        else:
            (root / f"{i:04d}.txt").write_text(caption + "\n")
    if lines:
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


TEXT_MODEL = {"text_encoder": "builtin", "text_width": 64, "text_depth": 2,
              "text_max_length": 24}


def text_config(folder: Path, ae: str | None = None, **sections: dict):
    data = json.loads(json.dumps(BASE))
    data["data"] = {"source": "folder", "path": str(folder), "image_size": 16, "channels": 1,
                    "val_fraction": 0.0}
    data["model"].update(TEXT_MODEL)
    if ae:
        data["autoencoder"]["pretrained"] = ae
    for name, values in sections.items():
        if name == "model" and "type" in values:
            data[name] = values
        else:
            data.setdefault(name, {}).update(values)
    return from_dict(data)


# -- captions ---------------------------------------------------------------------------------

def test_captions_are_read_in_both_conventions(tmp_path):
    for convention in ("jsonl", "txt"):
        root = digits_folder(tmp_path / convention, 6, convention)
        data = load_data(DataConfig(source="folder", path=str(root), image_size=16),
                         captions=True)
        assert data.captions == ["zero, handwritten", "a handwritten one", "two, handwritten",
                                 "a handwritten three", "four, handwritten",
                                 "a handwritten five"]
        assert load_data(DataConfig(source="folder", path=str(root))).captions is None
    # a caption's lines are joined and stripped (kohya's and OneTrainer's reading)
    (tmp_path / "txt" / "0001.txt").write_text("  a handwritten\n one \n")
    listing = list_folder(tmp_path / "txt")
    assert read_captions(listing.root, listing.files, DataConfig())[1] == "a handwritten one"
    # with a metadata.jsonl at the root, it alone is read
    (tmp_path / "txt" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i:04d}.png", "text": f"image {i}"}) + "\n"
                for i in range(6)))
    assert read_captions(listing.root, listing.files, DataConfig())[0] == "image 0"


@pytest.mark.parametrize("case, message", [
    ("no txt", "0002.png' has no caption ('"),
    ("empty txt", "0002.txt' is empty"),
    ("latin-1 txt", "0002.txt' is not UTF-8 text"),
    ("jsonl not json", "metadata.jsonl' line 2 is not a JSON object"),
    ("jsonl missing image", "names 'gone.png', which is not an image"),
    ("jsonl no column", "has no text column 'text' (file_name, caption)"),
    ("jsonl image left out", "0003.png' has no caption (no line of"),
])
def test_a_bad_caption_is_a_one_line_error_naming_the_file(tmp_path, case, message):
    root = digits_folder(tmp_path / "d", 4, "jsonl" if case.startswith("jsonl") else "txt")
    meta = root / "metadata.jsonl"
    if case == "no txt":
        (root / "0002.txt").unlink()
    elif case == "empty txt":
        (root / "0002.txt").write_text(" \n")
    elif case == "latin-1 txt":
        (root / "0002.txt").write_bytes("caf\xe9".encode("latin-1"))
    elif case == "jsonl not json":
        meta.write_text(meta.read_text().replace("0001.png", "0001.png\n{broken", 1))
    elif case == "jsonl missing image":
        meta.write_text(meta.read_text() + json.dumps({"file_name": "gone.png", "text": "x"}))
    elif case == "jsonl no column":
        meta.write_text(json.dumps({"file_name": "0000.png", "caption": "x"}) + "\n")
    else:
        meta.write_text("\n".join(meta.read_text().splitlines()[:3]) + "\n")
    cfg = DataConfig(source="folder", path=str(root), image_size=16)
    with pytest.raises(DataError) as info:
        load_data(cfg, captions=True)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1, info.value
    if case in ("no txt", "jsonl image left out"):  # opting in: the empty caption, counted
        data = load_data(DataConfig(source="folder", path=str(root), image_size=16,
                                    missing_caption="empty"), captions=True)
        assert data.captions.count("") == 1 and data.captions_missing == 1


def test_captions_are_part_of_the_cache_key(tmp_path):
    root = digits_folder(tmp_path / "d", 4, "txt")
    cfg = DataConfig(source="folder", path=str(root), image_size=16)
    before = source_digest(cfg, captions=True), source_digest(cfg)
    (root / "0001.txt").write_text("a handwritten seven")
    assert source_digest(cfg, captions=True) != before[0]
    assert source_digest(cfg) == before[1]  # an unconditional run's cache is unaffected


def test_text_settings_are_checked(tmp_path):
    root = digits_folder(tmp_path / "d", 4)
    with pytest.raises(ConfigError, match="model.num_classes and model.text_encoder"):
        text_config(root, model={"num_classes": 10})
    with pytest.raises(ConfigError, match="needs captions, which only a folder has"):
        text_config(root, data={"source": "digits", "path": None})
    with pytest.raises(ConfigError, match="data.caption_extension must look like .txt"):
        text_config(root, data={"caption_extension": "txt"})
    with pytest.raises(ConfigError, match="model.text_encoder is empty"):
        text_config(root, model={"text_encoder": " "})


# -- tokens, backbones and the seam ----------------------------------------------------------

def test_captions_become_byte_tokens_cut_on_a_character():
    tokens = tokenize(["ab", "", "é" * 5], 5)
    assert tokens[0].tolist() == [ord("a") + 1, ord("b") + 1, PAD, PAD, PAD]
    assert tokens[1].tolist() == [PAD] * 5  # the empty caption: the learned null
    assert tokens[2].tolist()[:4] == [0xC3 + 1, 0xA9 + 1] * 2 and tokens[2, 4] == PAD


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_a_text_backbone_starts_unconditional_and_masks_padding(kind):
    """Cross-attention's output (and the UNet's pooled projection) start at zero: the untrained
    model ignores the caption (cond_gap 0). Padding is masked: a caption's prediction does
    not depend on the length it is padded to."""
    torch.manual_seed(0)
    model = build_backbone({"type": kind, "args": {"in_channels": 4, "latent_size": 4,
                                                   **BACKBONES[kind], **TEXT_MODEL,
                                                   "text_width": 32}})
    assert model.condition_keys == (TOKENS,)
    x, t = torch.randn(3, 4, 4, 4), torch.rand(3)
    tokens = tokenize(["a handwritten seven", "one", ""], 24)
    with torch.no_grad():
        assert torch.equal(model(x, t, tokens=tokens), model(x, t))
        for p in model.parameters():  # any weights: cross-attention now moves the output
            p.add_(0.05 * torch.randn_like(p))
        out = model(x, t, tokens=tokens)
        assert not torch.allclose(out, model(x, t))
        # positions 20-24 are padding in every caption (the longest has 19 bytes)
        model.text.pos.data[:, 20:] += torch.randn(1, 5, 32)
        assert torch.allclose(model(x, t, tokens=tokens), out, atol=1e-5)
        assert torch.allclose(model(x[2:], t[2:], tokens=tokens[2:]), model(x[2:], t[2:]),
                              atol=1e-6)


def test_the_attention_logit_probe_leaves_out_padding():
    """optimization/attn_logit_max reads the logits that reach the output: a padding key's,
    however large, is masked out of it as out of the attention."""
    torch.manual_seed(0)
    cross = CrossAttention(8, 8, 2)
    x, context = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, False]] * 2)
    padded = context.clone()
    padded[:, 2:] = 1e4  # padding that would dominate an unmasked maximum
    logits = []
    for ctx in (context, padded):
        text = Text(ctx, mask, ctx[:, 0], torch.ones(2))
        logits.append(largest_attention_logit(cross, lambda text=text: cross(x, text)))
    assert logits[0] == pytest.approx(logits[1]) and logits[0] < 100


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_captions_that_never_reach_the_model_leave_it_unconditional(kind):
    """The empty caption adds nothing: a model trained on dropped captions only
    (cond_drop_prob 1) never trains its text path, so every caption predicts as the null one
    and cond_gap is exactly 0, as for labels (test_conditional.py)."""
    model = trained_on_null(kind, {**TEXT_MODEL, "text_width": 32},
                            {TOKENS: torch.zeros(8, 24, dtype=torch.long)})
    x, t = torch.randn(3, 4, 4, 4), torch.rand(3)
    with torch.no_grad():
        null = model(x, t)
        assert null.abs().max() > 0
        captioned = model(x, t, tokens=tokenize(["a handwritten seven", "one", "x"], 24))
        assert vm.cond_gap(captioned, null).item() == 0.0


def test_the_source_gives_rows_nulls_and_requests():
    captions = ["a handwritten one", "two, handwritten", "a handwritten one", ""]
    source = TextSource(24, captions, ["a handwritten one", "seven"])
    rows = source.rows(torch.tensor([1, 3]))
    assert rows[TOKENS].shape == (2, 24) and torch.equal(rows[TOKENS][1], torch.zeros(24).long())
    assert torch.equal(source.null(rows)[TOKENS], torch.zeros(2, 24, dtype=torch.long))
    default = source.request(5)
    assert default.groups.tolist() == [0, 1, 0, 1, 0] and default.columns == 2
    asked = source.request(64, ["red", "blue", "green"], 2)
    assert asked.groups.tolist() == [0, 0, 1, 1, 2, 2] and asked.columns == 2
    assert asked.names == ["red", "blue", "green"] and asked.by == "prompt"
    assert training_prompts(["mine"], captions, torch.arange(4)) == \
        ["mine", "a handwritten one", "two, handwritten"]
    labels = ClassSource(3, torch.tensor([2, 0, 1]))
    assert labels.rows(torch.tensor([0, 2]))[LABELS].tolist() == [2, 1]
    with pytest.raises(LdmkitError, match="--prompt needs a text-conditional model"):
        sampling_request(labels, 4, prompts=["red"])
    with pytest.raises(LdmkitError, match="not class-conditional"):
        sampling_request(source, 4, choice="3")


def test_a_prompt_file_is_read_or_refused_in_one_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a handwritten seven\n\n  three, handwritten \n")
    assert read_prompts(path) == ["a handwritten seven", "three, handwritten"]
    for content, message in ((b"\n \n", "holds no prompt"), (b"\xff\xfe", "is not UTF-8")):
        path.write_bytes(content)
        with pytest.raises(LdmkitError, match=message):
            read_prompts(path)
    with pytest.raises(LdmkitError, match="cannot be read"):
        read_prompts(tmp_path / "missing.txt")


# -- real runs -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def text_run(tmp_path_factory, digits_captioned, ae_digits) -> Path:
    path = tmp_path_factory.mktemp("text") / "run"
    train(text_config(digits_captioned, ae_digits, train={"steps": 800},
                      sample={"prompts": ["a handwritten seven"]}), path)
    return path


def digit_accuracy(run_dir: Path, guidance: float, per_digit: int = 10) -> float:
    """The share of samples of "a handwritten <digit>" the digits classifier reads as that
    digit (chance 0.1)."""
    trained = load_for_sampling(run_dir)
    cfg = from_dict(trained.config)
    source = source_of(cfg, prompts=None)
    request = source.request(0, [f"a handwritten {w}" for w in WORDS], per_digit)
    samples = generate(trained.model, trained.ae, trained.scale, cfg, len(request), "dpmpp_2m",
                       20, 1, request=request, guidance=guidance)
    clf = load_or_train(DataConfig(source="digits", image_size=16))[0]
    predicted = clf.embed(samples.images.float().div(127.5).sub(1))[1]
    return (predicted == request.groups).float().mean().item()


def cond_gaps(run_dir: Path) -> list[float]:
    return [r["value"] for r in map(json.loads, RunDir(run_dir).metrics.open())
            if r["tag"] == vm.COND_GAP]


@pytest.mark.xdist_group("text_run")
@pytest.mark.slow
def test_a_text_conditional_unet_follows_its_captions_and_is_healthy(text_run):
    serious = {e["code"] for e in raised(text_run) if e["severity"] != "info"}
    assert not serious, serious
    gaps = cond_gaps(text_run)
    assert min(gaps) > 0.01 and gaps[-1] > 0.1, gaps  # from exactly 0 untrained (above)
    prompts = RunDir(text_run).prompts()
    assert prompts[0] == "a handwritten seven" and len(prompts) == 8
    tags = {r["tag"] for r in map(json.loads, RunDir(text_run).metrics.open())}
    assert {vm.WITHIN_PROMPT, vm.LEAST_DIVERSE_PROMPT_MSE} <= tags
    accuracy = digit_accuracy(text_run, 3.0)
    print(f"digit accuracy of 'a handwritten <digit>' at guidance 3: {accuracy:.2f}")
    assert accuracy > 0.5  # chance: 0.1


@pytest.mark.slow
def test_a_text_conditional_dit_learns_its_captions(tmp_path, digits_captioned, ae_digits):
    dit = {"type": "dit", "patch_size": 1, "hidden_size": 64, "depth": 4, "num_heads": 4,
           **TEXT_MODEL}
    train(text_config(digits_captioned, ae_digits, model=dit,
                      train={"steps": 300, "eval_every": 300}), tmp_path / "run")
    serious = {e["code"] for e in raised(tmp_path / "run") if e["severity"] != "info"}
    assert not serious, serious
    # the in-loop eval: prompt adherence only (no class folders for the classifier)
    evals = {r["tag"] for r in map(json.loads, RunDir(tmp_path / "run").metrics.open())
             if r["tag"].startswith(vm.EVAL_PREFIX)}
    assert evals == {vm.EVAL_CLIP_SCORE, vm.EVAL_PROMPT_RETRIEVAL, vm.EVAL_CLIP_SCORE_REAL,
                     vm.EVAL_PROMPT_RETRIEVAL_REAL}, evals
    gaps = cond_gaps(tmp_path / "run")
    assert min(gaps) > 0.01 and gaps[-1] > 0.1, gaps  # from exactly 0 untrained (above)
    accuracy = digit_accuracy(tmp_path / "run", 3.0)
    print(f"DiT digit accuracy at guidance 3: {accuracy:.2f}")
    assert accuracy > 0.3  # chance: 0.1


@pytest.mark.slow
def test_captions_that_never_reach_the_model_are_diagnosed(tmp_path, digits_captioned,
                                                             ae_digits):
    # past min_steps (100 here) by ten log intervals: the rule has its five records
    train(text_config(digits_captioned, ae_digits, train={"steps": 200, "cond_drop_prob": 1.0}),
          tmp_path / "run")
    serious = {e["code"] for e in raised(tmp_path / "run") if e["severity"] != "info"}
    assert serious == {"conditioning_ignored"}


@pytest.mark.xdist_group("text_run")
@pytest.mark.slow
def test_one_collapsed_prompt_is_found_and_named(tmp_path, text_run):
    run_dir = tmp_path / "copy"
    shutil.copytree(text_run, run_dir)
    trained = load_for_sampling(run_dir)
    cfg = from_dict(trained.config)
    prompts = RunDir(run_dir).prompts()
    source = source_of(cfg, prompts=prompts)
    collapsed = tokenize([prompts[3]], 24)
    planted = Collapsed(trained.model, lambda cond: (cond[TOKENS] == collapsed).all(1),
                        torch.zeros(4, 4, 4))
    samples = generate(planted, trained.ae, trained.scale, cfg, 40, "ddim", 20, 5,
                       request=source.request(40), guidance=1.0)
    assert samples.vitals[vm.LEAST_DIVERSE_PROMPT] == 3
    with MetricLogger(run_dir, tensorboard=False) as logger:
        logger.log(trained.step, samples.vitals)
    findings = {f.code: f for f in diagnose_path(run_dir).findings}
    assert set(findings) == {"prompt_collapse"}, set(findings)
    assert f"prompt 3 {prompts[3]!r}" in findings["prompt_collapse"].message


@pytest.mark.xdist_group("text_run")
@pytest.mark.slow
def test_sampling_prompts_from_the_command_line(tmp_path, text_run, tiny_run, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(text_run, run_dir)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a handwritten three\nseven, handwritten\n")
    out = tmp_path / "grid"
    assert main(["sample", str(run_dir), "--prompt", "a handwritten one", "--prompts",
                 str(prompt_file), "--num", "2", "--steps", "5", "--guidance", "3",
                 "--out", str(out)]) == 0
    assert len(list(out.glob("0*.png"))) == 6
    assert (out / "prompts.txt").read_text().splitlines() == [
        "a handwritten one", "a handwritten three", "seven, handwritten"]
    grid = Image.open(out / "grid.png")
    assert grid.size[1] > grid.size[0]  # 3 rows of 2: one row per prompt
    assert main(["report", str(run_dir)]) == 0  # the grids' columns, named
    html = RunDir(run_dir).report_html.read_text()
    assert "One prompt per column" in html and "<li>a handwritten seven</li>" in html
    assert main(["sample", str(tiny_run.run_dir), "--prompt", "a cat", "--num", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prompt needs a text-conditional model" in err[-1]
    RunDir(run_dir).prompts_file.write_text('{"not": "a list"}')
    assert main(["sample", str(run_dir), "--num", "2", "--steps", "2"]) == 2
    assert "prompts.json' is damaged" in capsys.readouterr().err


@pytest.mark.xdist_group("text_run")
@pytest.mark.slow
def test_a_text_run_exports_and_plain_diffusers_draws_its_prompt(tmp_path, text_run):
    """``ldmkit export``: the UNet under diffusers' ``encoder_hidden_states`` convention and
    the byte encoder beside it; a plain diffusers DDIM loop with classifier-free guidance
    draws sevens for "a handwritten seven"."""
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    from ldmkit.models.diffusers_export import LdmkitAutoencoder, LdmkitTextEncoder, LdmkitUNet

    out = tmp_path / "out"
    assert main(["export", str(text_run), str(out)]) == 0
    unet = LdmkitUNet.from_pretrained(out / "unet").eval()
    encoder = LdmkitTextEncoder.from_pretrained(out / "text_encoder").eval()
    assert not any(k.startswith("net.text.") for k in unet.state_dict())  # not written twice
    model = load_for_sampling(text_run).model
    prompts = ["a handwritten seven", "three, handwritten", ""]
    x, k = torch.randn(3, 4, 4, 4), torch.tensor([0, 500, 999])
    with torch.no_grad():
        text = encoder(encoder.tokenize(prompts))
        got = unet(x, k, encoder_hidden_states=text.context,
                   encoder_attention_mask=text.mask).sample
        assert torch.allclose(got, model(x, k / 999.0, tokens=tokenize(prompts, 24)), atol=1e-5)
        assert torch.allclose(got[2:], model(x[2:], k[2:] / 999.0), atol=1e-5)  # "": the null
        scheduler = DDIMScheduler.from_pretrained(out / "scheduler")
        vae = LdmkitAutoencoder.from_pretrained(out / "vae")
        scheduler.set_timesteps(20)
        both = encoder(encoder.tokenize(["a handwritten seven"] * 10 + [""] * 10))
        z = torch.randn(10, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        for step in scheduler.timesteps:
            cond, null = unet(torch.cat([z, z]), step.expand(20), encoder_hidden_states=both.context,
                              encoder_attention_mask=both.mask).sample.chunk(2)
            z = scheduler.step(null + 3.0 * (cond - null), step, z).prev_sample
        images = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
    clf = load_or_train(DataConfig(source="digits", image_size=16))[0]
    sevens = (clf.embed(images)[1] == 7).float().mean().item()
    print(f"plain diffusers loop: {sevens:.2f} of 'a handwritten seven' read as 7")
    assert sevens >= 0.6


@pytest.mark.slow
def test_the_image_text_model_knows_real_images_captions(digits_captioned):
    """Known answers for the in-project CLIP: held-out real digits score higher with their own
    captions than with the same captions shuffled, and their caption is retrieved far above
    chance (1 in 20 distinct captions); shuffled, near chance."""
    cfg = DataConfig(source="folder", path=str(digits_captioned), image_size=16)
    model = load_or_train_image_text(cfg)
    held_out = split_captioned(cfg)[1]
    shuffled = [held_out.captions[i] for i in
                torch.randperm(len(held_out), generator=torch.Generator().manual_seed(0))]
    print(f"real held-out digits: clip score {model.real_clip_score:.3f}, retrieval "
          f"{model.real_retrieval:.3f}; shuffled captions: "
          f"{model.clip_score(held_out.images, shuffled):.3f}, "
          f"{model.retrieval(held_out.images, shuffled):.3f}")
    assert model.real_clip_score > model.clip_score(held_out.images, shuffled) + 0.3
    assert model.real_retrieval > 0.3 > 0.15 > model.retrieval(held_out.images, shuffled)
    assert model.real_clip_score == pytest.approx(
        model.clip_score(held_out.images, held_out.captions))
    assert load_or_train_image_text(cfg).real_retrieval == model.real_retrieval  # cached


@pytest.mark.xdist_group("text_run")
@pytest.mark.slow
def test_eval_measures_how_samples_follow_their_prompts(tmp_path, text_run, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(text_run, run_dir)
    assert main(["eval", str(run_dir), "--num", "40", "--steps", "10", "--guidance", "1,3"]) == 0
    out = capsys.readouterr().out
    assert "FD, precision, recall and memorization skipped" in out  # no class folders
    values = {r["tag"]: r["value"] for r in map(json.loads, RunDir(run_dir).metrics.open())}
    guided = vm.guidance_tag(vm.EVAL_PROMPT_RETRIEVAL, 3.0)
    print(f"prompt retrieval {values[vm.EVAL_PROMPT_RETRIEVAL]:.3f} at guidance 1, "
          f"{values[guided]:.3f} at 3; real {values[vm.EVAL_PROMPT_RETRIEVAL_REAL]:.3f}")
    assert values[guided] > 0.2  # chance: 1 in 20 distinct captions
    assert values[vm.guidance_tag(vm.EVAL_CLIP_SCORE, 3.0)] > 0.2
    assert 0 < values[vm.EVAL_CLIP_SCORE_REAL] <= 1


@pytest.mark.slow
def test_a_killed_text_run_resumes_to_the_same_end(tmp_path, digits_captioned):
    """SIGKILL during a sampling, then ``--resume``: the same weights, generators and records
    as a run never interrupted (tests/test_kill_points.py's driver)."""
    import yaml
    from conftest import TINY

    def write(name: str) -> tuple[Path, Path]:
        cfg = {**TINY, "run_dir": str(tmp_path / name),
               "data": {"source": "folder", "path": str(digits_captioned), "image_size": 16,
                        "limit": 128, "val_fraction": 0.05},
               "model": {**TINY["model"], **TEXT_MODEL, "text_width": 32},
               "train": {**TINY["train"], "steps": STEPS, "checkpoint_every": 4,
                         "sample_every": 4, "val_every": 4, "log_every": 2}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path, tmp_path / name

    straight, reference = write("straight")
    done = run_cli(["train", str(straight)])
    assert done.returncode == 0, done.stdout + done.stderr
    path, run_dir = write("killed")
    first = run_cli(["train", str(path)], ("ldmkit.training.outputs", "generate", 1))
    assert first.returncode == -9, first.stdout + first.stderr
    resumed = run_cli(["train", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_end(run_dir, reference)
    assert RunDir(run_dir).prompts() == RunDir(reference).prompts()
