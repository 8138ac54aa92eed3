"""A diffusers AutoencoderKL saved locally as stage 1 (tiny, randomly initialised, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from conftest import TINY, tiny_config
from diffusers import AutoencoderKL

from ldmkit.cli import main
from ldmkit.train import train
from ldmkit.vitals import metrics as vm


def save_vae(path: Path, scaling_factor: float) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, layers_per_block=1,
                        block_out_channels=(8, 16), norm_num_groups=4, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=scaling_factor)
    vae.save_pretrained(path)
    return path


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "findings.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def test_a_diffusers_vae_is_stage_1_and_its_scaling_factor_is_checked(tmp_path):
    vae_dir = save_vae(tmp_path / "vae", scaling_factor=0.18215)
    cfg = tiny_config(autoencoder={**TINY["autoencoder"], "pretrained": str(vae_dir)},
                      train={"steps": 8})
    result = train(cfg, tmp_path / "run")
    assert result.step == 8 and 0.8 < result.vitals[vm.Z_STD] < 1.2  # calibrated, not 0.18215
    (event,) = [e for e in events(tmp_path / "run") if e["code"] == "vae_scale_mismatch"]
    assert event["severity"] == "warning" and "0.18215" in event["message"]
    assert f"{result.latent_scale_factor:.4g}" in event["fix"]
    # the run holds its own copy of the VAE: it samples after the source is gone
    for f in vae_dir.iterdir():
        f.unlink()
    assert main(["sample", str(tmp_path / "run"), "--num", "4", "--steps", "2",
                 "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "grid.png").is_file()


def test_a_matching_scaling_factor_raises_nothing(tmp_path):
    first = train(tiny_config(autoencoder={**TINY["autoencoder"], "pretrained": str(
        save_vae(tmp_path / "probe", 1.0))}, train={"steps": 1}), tmp_path / "probe-run")
    vae_dir = save_vae(tmp_path / "vae", scaling_factor=first.latent_scale_factor * 1.1)
    cfg = tiny_config(autoencoder={**TINY["autoencoder"], "pretrained": str(vae_dir)},
                      train={"steps": 2})
    train(cfg, tmp_path / "run")
    assert not [e for e in events(tmp_path / "run") if e["code"] == "vae_scale_mismatch"]


def test_a_pickled_diffusers_vae_is_refused(tmp_path, capsys):
    vae_dir = save_vae(tmp_path / "vae", 0.18215)
    weights = next(vae_dir.glob("*.safetensors"))
    torch.save({"x": torch.zeros(1)}, vae_dir / "diffusion_pytorch_model.bin")
    weights.unlink()
    cfg = {**TINY, "autoencoder": {**TINY["autoencoder"], "pretrained": str(vae_dir)},
           "run_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot be loaded" in err and "safetensors" in err
