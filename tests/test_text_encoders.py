"""Frozen pretrained text encoders (issue 28, item 3): a tiny CLIP and a tiny T5 built from
their configs with random weights and tokenizers that need no file (an in-memory ``tokenizers``
vocabulary; ``ByT5Tokenizer``), saved to directories as a diffusers pipeline and a bare model
lay them out, and trained through with nothing downloaded (conftest sets ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_conditional import BACKBONES
from test_faults import raised
from test_text import WORDS, cond_gaps, digits_folder, text_config
from tiny_pipelines import CLIP_LENGTH, char_tokenizer

from ldmkit.cli import main
from ldmkit.conditioning.sources import EncodedTextSource, source_of
from ldmkit.config import from_dict
from ldmkit.data.latents import TEXT_FILE
from ldmkit.diffusion.condition import CONTEXT, CONTEXT_MASK, POOLED, null
from ldmkit.diffusion.parameterization import Parameterization
from ldmkit.errors import ConfigError
from ldmkit.models.hf_text import FrozenTextEncoder, encoder_info
from ldmkit.models.registry import build_backbone
from ldmkit.run.checkpoint import load_checkpoint
from ldmkit.run.layout import RunDir
from ldmkit.sampling.trained import load_for_sampling
from ldmkit.training.loop import train

transformers = pytest.importorskip("transformers")


def save_tiny_clip(root: Path) -> Path:
    """A 2-layer ``CLIPTextModelWithProjection`` (pooled: 16-wide ``text_embeds``, as SDXL's
    second encoder) in ``root/text_encoder``, its character-level tokenizer (start and end
    tokens, padded with the end token, as CLIP's) in ``root/tokenizer``; returns the encoder's
    directory."""
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_LENGTH, projection_dim=16,
        bos_token_id=0, eos_token_id=1, pad_token_id=1)
    transformers.CLIPTextModelWithProjection(config).save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    return root / "text_encoder"


def save_tiny_t5(path: Path) -> Path:
    """A 2-layer ``T5EncoderModel`` (no pooled embedding) and ``ByT5Tokenizer`` (bytes: no
    vocabulary file) in one directory."""
    torch.manual_seed(1)
    config = transformers.T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0)
    transformers.T5EncoderModel(config).save_pretrained(path)
    transformers.ByT5Tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("t5") / "encoder")


def test_an_encoder_directory_is_read_for_its_widths(tiny_clip, tiny_t5):
    clip = encoder_info(tiny_clip, CLIP_LENGTH)
    assert (clip.architecture, clip.context_dim, clip.pooled_dim, clip.max_positions) == \
        ("CLIPTextModelWithProjection", 32, 16, CLIP_LENGTH)
    assert clip.tokenizer == tiny_clip.parent / "tokenizer"  # the pipeline's sibling
    t5 = encoder_info(tiny_t5, 500)  # relative positions: any length
    assert (t5.context_dim, t5.pooled_dim, t5.tokenizer) == (32, None, tiny_t5)


def test_a_bad_encoder_directory_is_a_one_line_error(tmp_path, tiny_clip, monkeypatch):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    no_tokenizer = tmp_path / "lonely"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((tiny_clip / name).read_bytes())
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_clip / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    cases = [(tmp_path / "nowhere", None, "is not a directory"),
             (tmp_path, None, "has no readable config.json"),
             (bert, None, "holds a BertModel, not a text encoder"),
             (pickled, None, "has no .safetensors weights"),
             (no_tokenizer, None, "has no tokenizer in it"),
             (tiny_clip, 77, f"longer than the {CLIP_LENGTH} tokens")]
    for path, length, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            encoder_info(path, length)
        assert len(str(info.value).splitlines()) == 1
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'ldmkit\[text\]'"):
        encoder_info(tiny_clip)


def test_a_run_with_a_bad_encoder_writes_nothing(tmp_path):
    root = digits_folder(tmp_path / "d", 8)
    cfg = text_config(root, model={"text_encoder": str(tmp_path / "gone")})
    with pytest.raises(ConfigError, match="is not a directory"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_the_null_condition_is_the_encoded_empty_caption(kind, tiny_clip):
    """``condition.null``'s all-False mask stands for the empty caption's encoding, which the
    source gives the backbone (and its checkpoint keeps): a dropped caption and ``""`` predict
    alike, and a caption differs once cross-attention has weights."""
    source = EncodedTextSource(CLIP_LENGTH, encoder=str(tiny_clip))
    torch.manual_seed(0)
    model = build_backbone({"type": kind, "args": {
        "in_channels": 4, "latent_size": 4, **BACKBONES[kind], "text_encoder": str(tiny_clip),
        "text_max_length": CLIP_LENGTH, "text_context_dim": 32, "text_pooled_dim": 16}})
    assert model.condition_keys == (CONTEXT, CONTEXT_MASK, POOLED)
    source.attach(model)
    assert model.text.null_mask.sum() == 2  # start and end tokens
    x, t = torch.randn(3, 4, 4, 4), torch.rand(3)
    cond = source.encode(["a handwritten seven", "", "one"])
    with torch.no_grad():
        assert torch.equal(model(x, t, **cond), model(x, t, **null(cond)))  # zero-init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        dropped, empty = model(x, t, **null(cond)), model(x, t, **cond)
        assert torch.allclose(dropped[1], empty[1], atol=1e-5)
        assert not torch.allclose(dropped[0], empty[0], atol=1e-3)
    assert {k for k in model.state_dict() if k.startswith("text.")} == \
        {"text.null_context", "text.null_mask", "text.null_pooled"}  # frozen: not trained


@pytest.fixture(scope="session")
def clip_run(tmp_path_factory, digits_captioned, ae_digits, tiny_clip) -> tuple[Path, list]:
    """A UNet trained 400 steps through the frozen tiny CLIP; with the encoder's calls."""
    calls: list[int] = []
    encode = FrozenTextEncoder.encode

    def counted(self, texts, batch=64):
        calls.append(len(texts))
        return encode(self, texts, batch)

    path = tmp_path_factory.mktemp("clip") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FrozenTextEncoder, "encode", counted)
        train(text_config(digits_captioned, ae_digits, train={"steps": 400},
                          model={"text_encoder": str(tiny_clip),
                                 "text_max_length": CLIP_LENGTH},
                          sample={"prompts": ["a handwritten seven"]}), path)
    return path, calls


@pytest.mark.xdist_group("clip_run")
@pytest.mark.slow
def test_a_unet_learns_its_captions_through_a_frozen_clip(clip_run):
    run_dir, calls = clip_run
    # the distinct captions (and the empty one) were encoded once, into the cache; training
    # and its samplings read them there (sample.prompts' one caption is among them)
    assert calls == [21], calls
    meta = json.loads((RunDir(run_dir).latent_cache / "meta.json").read_text())
    assert len(meta["text_captions"]) == 21 and meta["text_captions"][0] == ""
    assert (RunDir(run_dir).latent_cache / TEXT_FILE).is_file()
    serious = {e["code"] for e in raised(run_dir) if e["severity"] != "info"}
    assert not serious, serious
    gaps = cond_gaps(run_dir)
    assert gaps[-1] > 0.05, gaps  # exactly 0 untrained: cross-attention starts at zero
    weights, _, _ = load_checkpoint(RunDir(run_dir).latest_checkpoint())
    assert not any("text_model" in k for k in weights)  # the encoder is not in the checkpoint
    right, wrong = caption_losses(run_dir)
    print(f"denoising loss with the right digit's caption {right:.4f}, a wrong one's {wrong:.4f}")
    assert right < 0.97 * wrong  # equal if the captions never reached the model


def caption_losses(run_dir: Path, count: int = 200) -> tuple[float, float]:
    """The denoising loss of the first ``count`` training latents at fixed noise, given their
    captions and given each caption with another digit's word: a model that reads its
    captions through the encoder does better with the right ones."""
    trained = load_for_sampling(run_dir)
    cache = RunDir(run_dir).latent_cache
    captions = json.loads((cache / "meta.json").read_text())["captions"][:count]
    z = torch.from_numpy(np.load(cache / "mean.npy")[:count]) * trained.scale
    source = source_of(from_dict(trained.config), prompts=None)

    def other(caption: str) -> str:
        word = next(w for w in WORDS if w in caption.split(" ") or caption.startswith(w + ","))
        return caption.replace(word, WORDS[(WORDS.index(word) + 3) % 10])

    losses = []
    for texts in (captions, [other(c) for c in captions]):
        cond, total = source.encode(texts), 0.0
        for level in (0.2, 0.4, 0.6):
            eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                total += Parameterization().loss(trained.model, z, torch.full((count,), level),
                                                 eps, cond).loss.item()
        losses.append(total / 3)
    return losses[0], losses[1]


@pytest.mark.xdist_group("clip_run")
@pytest.mark.slow
def test_prompts_the_cache_lacks_load_the_encoder(clip_run, tmp_path, tiny_clip):
    run_dir, _ = clip_run
    trained = load_for_sampling(run_dir)
    source = source_of(from_dict(trained.config), prompts=RunDir(run_dir).prompts())
    assert source.encoded is None  # no cache given: prompts are encoded on demand
    request = source.request(4, ["a handwritten three", "zero, handwritten"], 2)
    assert request.cond[CONTEXT].shape == (4, CLIP_LENGTH, 32)
    assert request.cond[POOLED].shape == (4, 16)
    out = tmp_path / "grid"
    assert main(["sample", str(run_dir), "--prompt", "a handwritten nine", "--num", "2",
                 "--steps", "4", "--out", str(out)]) == 0
    assert (out / "prompts.txt").read_text().splitlines() == ["a handwritten nine"]


@pytest.mark.xdist_group("clip_run")
@pytest.mark.slow
def test_a_frozen_clip_run_exports_with_its_encoder(clip_run, tmp_path):
    """The UNet loads in diffusers and takes what the exported CLIP and tokenizer give, loaded
    by transformers alone: SDXL's ``text_embeds`` as the pooled embedding."""
    pytest.importorskip("diffusers")
    from ldmkit.models.diffusers_export import LdmkitUNet

    run_dir, _ = clip_run
    out = tmp_path / "out"
    assert main(["export", str(run_dir), str(out)]) == 0
    unet = LdmkitUNet.from_pretrained(out / "unet").eval()
    encoder = transformers.CLIPTextModelWithProjection.from_pretrained(
        out / "text_encoder", local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "tokenizer",
                                                           local_files_only=True)
    prompts = ["a handwritten seven", "nine, handwritten", ""]
    tokens = tokenizer(prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                       return_tensors="pt")
    trained = load_for_sampling(run_dir)
    source = source_of(from_dict(trained.config), prompts=None)
    x, k = torch.randn(3, 4, 4, 4), torch.tensor([0, 500, 999])
    with torch.no_grad():
        states = encoder(**tokens)
        got = unet(x, k, encoder_hidden_states=states.last_hidden_state,
                   encoder_attention_mask=tokens.attention_mask,
                   added_cond_kwargs={"text_embeds": states.text_embeds}).sample
        want = trained.model(x, k / 999.0, **source.encode(prompts))
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.slow
def test_a_dit_trains_through_a_frozen_t5(tmp_path, digits_captioned, ae_digits, tiny_t5):
    encoder = tmp_path / "t5"
    shutil.copytree(tiny_t5, encoder)
    dit = {"type": "dit", "patch_size": 1, "hidden_size": 64, "depth": 2, "num_heads": 4,
           "text_encoder": str(encoder), "text_max_length": 24}

    def config(steps: int):
        return text_config(digits_captioned, ae_digits, model=dit, train={"steps": steps},
                           data={"latent_cache": str(tmp_path / "cache")})

    train(config(200), tmp_path / "run")
    serious = {e["code"] for e in raised(tmp_path / "run") if e["severity"] != "info"}
    assert not serious, serious
    assert cond_gaps(tmp_path / "run")[-1] > 0.01
    trained = load_for_sampling(tmp_path / "run")
    assert trained.model.text.pooled_dim is None
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    from ldmkit.models.diffusers_export import LdmkitDiT

    exported = LdmkitDiT.from_pretrained(tmp_path / "out" / "transformer").eval()
    t5 = transformers.T5EncoderModel.from_pretrained(tmp_path / "out" / "text_encoder",
                                                     local_files_only=True)
    tokens = transformers.AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")(
        ["one, handwritten", ""], padding="max_length", max_length=24, return_tensors="pt")
    x, k = torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    with torch.no_grad():
        got = exported(x, k, encoder_hidden_states=t5(**tokens).last_hidden_state,
                  encoder_attention_mask=tokens.attention_mask).sample
        want = trained.model(x, k / 999.0, **source_of(from_dict(trained.config)).encode(
            ["one, handwritten", ""]))
    assert torch.allclose(got, want, atol=1e-5)
    # a second run on the same cache and encoder encodes nothing; a changed encoder rebuilds it
    encoded: list[int] = []
    original = FrozenTextEncoder.encode
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FrozenTextEncoder, "encode", lambda self, texts, batch=64:
                      encoded.append(len(texts)) or original(self, texts, batch))
        train(config(2), tmp_path / "again")
        assert encoded == []
        settings = json.loads((encoder / "config.json").read_text())
        (encoder / "config.json").write_text(json.dumps({**settings, "dropout_rate": 0.2}))
        train(config(2), tmp_path / "other")
        assert encoded == [21]
