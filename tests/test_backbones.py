"""The backbone registry (issue 14): ``model.type`` unet | dit, specs in checkpoints, old runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config
from safetensors.torch import load_file

from ldmkit.cli import main
from ldmkit.config import DiTConfig, UNetConfig, from_dict
from ldmkit.errors import ConfigError
from ldmkit.models.dit import DiT
from ldmkit.models.registry import backbone_spec, build_backbone
from ldmkit.run.layout import RunDir
from ldmkit.sampling.trained import load_for_sampling
from ldmkit.training.loop import train
from ldmkit.vitals import metrics as vm

TINY_DIT = {"type": "dit", "patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 2}


def dit_config(**sections: dict):
    return tiny_config(model=TINY_DIT, **sections) if "model" not in sections else \
        tiny_config(**sections)


def test_the_model_section_chooses_the_backbone_and_checks_its_own_keys():
    assert isinstance(tiny_config().model, UNetConfig)
    cfg = tiny_config(model={"type": "dit", "depth": 3})
    assert isinstance(cfg.model, DiTConfig) and cfg.model.depth == 3
    with pytest.raises(ConfigError, match="unknown config key 'model.base_channels' for "
                                          "model.type 'dit'; allowed: type, patch_size"):
        tiny_config(model={"type": "dit", "base_channels": 16})
    with pytest.raises(ConfigError, match="'model.type' must be one of 'unet', 'dit', got 'vit'"):
        tiny_config(model={"type": "vit"})
    with pytest.raises(ConfigError, match="divisible by model.patch_size 3"):
        tiny_config(model={**TINY_DIT, "patch_size": 3})
    with pytest.raises(ConfigError, match="model.num_heads 3 does not divide model.hidden_size"):
        tiny_config(model={**TINY_DIT, "num_heads": 3})
    with pytest.raises(ConfigError, match="config key 'model' must be a mapping"):
        tiny_config(model="dit")
    with pytest.raises(ConfigError, match="'model.type' must be one of"):
        tiny_config(model={"type": ["dit"]})


def test_a_config_with_the_old_unet_section_is_a_unet_model():
    old = from_dict({"unet": {"base_channels": 24, "num_heads": 2}})
    assert old.model == UNetConfig(base_channels=24, num_heads=2)
    assert from_dict({"model": {"base_channels": 8},
                      "unet": {"num_heads": 2}}).model == UNetConfig(base_channels=8, num_heads=2)
    with pytest.raises(ConfigError, match="'model.base_channels' for model.type 'dit'"):
        from_dict({"model": {"type": "dit"}, "unet": {"base_channels": 2}})


def test_a_spec_read_from_a_file_is_checked_before_anything_is_built():
    spec = backbone_spec(DiTConfig(hidden_size=32, depth=1, num_heads=2), 4, 8)
    assert spec == {"type": "dit", "args": {"in_channels": 4, "latent_size": 8, "patch_size": 2,
                                            "hidden_size": 32, "depth": 1, "num_heads": 2,
                                            "num_classes": None}}
    assert isinstance(build_backbone(spec), DiT)
    for bad, needle in (({"type": "vit", "args": {}}, "unknown backbone type 'vit'"),
                        ({"type": "dit"}, "no argument mapping"),
                        ({"type": "dit", "args": {**spec["args"], "width": 3}}, "width"),
                        ({"type": "unet", "args": {"latent_size": 8}}, "in_channels")):
        with pytest.raises(ValueError, match=needle):
            build_backbone(bad)


def test_the_untrained_dit_predicts_zero_and_its_output_moves_with_its_input():
    """adaLN-Zero: the zero-initialised modulations and output layer make every block the
    identity and the prediction 0, the trivial predictor the loss bands start from."""
    model = DiT(4, 8, patch_size=2, hidden_size=32, depth=2, num_heads=2)
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    assert torch.equal(model(x, t), torch.zeros_like(x))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    y = model(x, t)
    moved = x.clone()
    moved[:, :, :2, :2] += 1.0  # one patch changes: attention spreads it to every token
    assert y.shape == x.shape and not torch.allclose(model(moved, t)[:, :, 4:, 4:], y[:, :, 4:, 4:])


@pytest.mark.parametrize("num_classes", [None, 3])
def test_the_dit_is_diffusers_dit_transformer_with_the_same_weights(num_classes):
    """Unconditional, and class-conditional with diffusers' null class (index num_classes)
    being ours (-1 or num_classes)."""
    pytest.importorskip("diffusers")
    from ldmkit.models.diffusers_export import dit_to_diffusers

    torch.manual_seed(0)
    args = {"in_channels": 4, "latent_size": 8, "patch_size": 2, "hidden_size": 64, "depth": 3,
            "num_heads": 4, "num_classes": num_classes}
    model = DiT(**args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            torch.nn.init.normal_(p if name != "label_emb.table.weight" else p[:-1], std=0.1)
    theirs = dit_to_diffusers(model, **args).eval()
    assert torch.equal(theirs.pos_embed.pos_embed, model.pos)
    x, t = torch.randn(5, 4, 8, 8), torch.rand(5)
    labels = torch.tensor([0, 1, 2, 3, 1]) if num_classes else torch.zeros(5, dtype=torch.long)
    ours = torch.tensor([0, 1, 2, -1, 1]) if num_classes else None
    with torch.no_grad():
        out = theirs(x, 999 * t, class_labels=labels).sample
        assert torch.allclose(out, model(x, t, labels=ours), atol=1e-5)


@pytest.mark.slow
def test_a_dit_run_trains_resumes_exactly_samples_and_records_its_backbone(tmp_path):
    cfg = dit_config(train={"steps": 8, "checkpoint_every": 4, "sample_every": 100})
    straight = train(cfg, tmp_path / "straight")
    assert straight.step == 8 and torch.isfinite(torch.tensor(straight.vitals[vm.LOSS]))
    train(cfg, tmp_path / "split", stop_at=4)
    train(RunDir(tmp_path / "split").load_config(), tmp_path / "split", resume=True)
    a, b = (load_file(str(tmp_path / run / "checkpoints/step_0000008/weights.safetensors"))
            for run in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "straight/checkpoints/step_0000008/meta.json").read_text())
    assert meta["backbone"] == {"type": "dit", "args": {"in_channels": 4, "latent_size": 4,
                                                        **{k: v for k, v in TINY_DIT.items()
                                                           if k != "type"},
                                                        "num_classes": None}}
    assert "model:\n  type: dit" in (tmp_path / "straight/config.yaml").read_text()
    assert main(["sample", str(tmp_path / "straight"), "--num", "4", "--steps", "3",
                 "--sampler", "heun", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "grid.png").is_file()


@pytest.mark.slow
def test_export_of_a_dit_run_is_loaded_and_sampled_by_plain_diffusers(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from ldmkit.models.diffusers_export import LdmkitAutoencoder

    run = train(dit_config(train={"steps": 4, "sample_every": 100}), tmp_path / "run")
    assert main(["export", str(run.run_dir), str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / "unet").exists()
    transformer = DiTTransformer2DModel.from_pretrained(tmp_path / "out" / "transformer").eval()
    scheduler = DDIMScheduler.from_pretrained(tmp_path / "out" / "scheduler")
    vae = LdmkitAutoencoder.from_pretrained(tmp_path / "out" / "vae")
    model = load_for_sampling(run.run_dir).model
    x, k = torch.randn(3, 4, 4, 4), torch.tensor([0, 500, 999])
    label = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        assert torch.allclose(transformer(x, k, class_labels=label).sample, model(x, k / 999.0),
                              atol=1e-5)
        scheduler.set_timesteps(5)
        z = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        for step in scheduler.timesteps:
            out = transformer(z, step.expand(4), class_labels=label[:1].expand(4)).sample
            z = scheduler.step(out, step, z).prev_sample
        images = vae.decode(z / vae.config.scaling_factor).sample
    assert torch.isfinite(images).all() and images.shape == (4, 1, 16, 16)


@pytest.mark.slow
def test_a_run_saved_before_the_registry_still_samples_and_resumes(tmp_path, capsys):
    """Old runs: a ``unet:`` config section and checkpoints without a backbone spec."""
    run = train(tiny_config(train={"steps": 4, "sample_every": 100}), tmp_path / "run").run_dir
    old = tmp_path / "old"
    shutil.copytree(run, old)
    saved = yaml.safe_load((old / "config.yaml").read_text())
    saved["unet"] = {k: v for k, v in saved.pop("model").items() if k != "type"}
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    for meta_path in (old / "checkpoints").glob("step_*/meta.json"):
        meta = json.loads(meta_path.read_text())
        del meta["backbone"]
        meta["config"]["unet"] = {k: v for k, v in meta["config"].pop("model").items()
                                  if k != "type"}
        meta_path.write_text(json.dumps(meta))
    assert isinstance(RunDir(old).load_config().model, UNetConfig)
    assert load_for_sampling(old).backbone == load_for_sampling(run).backbone
    assert main(["sample", str(old), "--num", "2", "--steps", "2", "--out",
                 str(tmp_path / "s")]) == 0
    assert main(["train", "--resume", str(old), "--set", "train.steps=6"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(old), "--set", "unet.num_heads=2"]) == 2
    assert "cannot change model.num_heads when resuming" in capsys.readouterr().err


def test_each_backbone_entry_is_its_config_section_network_and_export_adapter():
    """The registry and the config agree, and every entry's export adapter exists (a new
    backbone without one is refused by export, below)."""
    import importlib

    from ldmkit.config.schema import MODELS
    from ldmkit.models.registry import BACKBONES

    assert set(BACKBONES) == set(MODELS)
    exporters = importlib.import_module("ldmkit.models.diffusers_export")
    for name, entry in BACKBONES.items():
        assert entry.config is MODELS[name] and callable(getattr(exporters, entry.export))


def test_export_refuses_an_unknown_backbone_in_one_line():
    """A backbone without an entry is never written as another one (a UNet, say)."""
    from ldmkit.errors import LdmkitError
    from ldmkit.models.registry import export_backbone

    with pytest.raises(LdmkitError, match="cannot export backbone type 'mamba'.*exports unet, dit"):
        export_backbone({"type": "mamba", "args": {}}, torch.nn.Linear(1, 1), Path("/nonexistent"))
