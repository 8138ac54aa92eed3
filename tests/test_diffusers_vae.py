"""A diffusers AutoencoderKL saved locally as stage 1 (tiny, randomly initialised, no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, tiny_config
from diffusers import AutoencoderKL

from ldmkit.cli import main
from ldmkit.training.loop import train
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


def test_export_is_loaded_by_diffusers_and_reproduces_the_model(tmp_path):
    from diffusers import DDIMScheduler

    from ldmkit.diffusion.schedule import CosineSchedule
    from ldmkit.models.diffusers_export import LdmkitAutoencoder, LdmkitUNet
    from ldmkit.sampling.trained import load_for_sampling

    run = train(tiny_config(train={"steps": 4}), tmp_path / "run")
    assert main(["export", str(run.run_dir), str(tmp_path / "out")]) == 0
    unet = LdmkitUNet.from_pretrained(tmp_path / "out" / "unet")
    scheduler = DDIMScheduler.from_pretrained(tmp_path / "out" / "scheduler")
    vae = LdmkitAutoencoder.from_pretrained(tmp_path / "out" / "vae")
    _, _, model, ae, scale, _ = load_for_sampling(run.run_dir)
    assert vae.config.scaling_factor == pytest.approx(scale)
    size = unet.config.sample_size
    x = torch.randn(3, 4, size, size)
    k = torch.tensor([0, 500, 999])
    with torch.no_grad():
        assert torch.allclose(unet(x, k).sample, model(x, k / 999.0), atol=1e-5)
        assert torch.allclose(vae.decode(x).sample, ae.decode(x), atol=1e-5)
    t = torch.tensor([0, 500, 999], dtype=torch.float64) / 999
    want = torch.sigmoid(CosineSchedule(-5.0, 10.0).logsnr(t)).float()
    assert torch.allclose(scheduler.alphas_cumprod[[0, 500, 999]], want, rtol=1e-4)
    # a plain diffusers DDIM loop over the exported parts gives finite, decodable samples
    scheduler.set_timesteps(10)
    z = torch.randn(4, 4, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for step in scheduler.timesteps:
            z = scheduler.step(unet(z, step).sample, step, z).prev_sample
        images = vae.decode(z / vae.config.scaling_factor).sample
    assert torch.isfinite(images).all() and images.shape == (4, 1, 16, 16)


def test_export_of_a_diffusers_vae_run_keeps_the_vae_and_sets_its_scale(tmp_path):
    vae_dir = save_vae(tmp_path / "vae", scaling_factor=0.18215)
    cfg = tiny_config(autoencoder={**TINY["autoencoder"], "pretrained": str(vae_dir)},
                      train={"steps": 2})
    run = train(cfg, tmp_path / "run")
    assert main(["export", str(run.run_dir), str(tmp_path / "out")]) == 0
    vae = AutoencoderKL.from_pretrained(tmp_path / "out" / "vae")
    assert vae.config.scaling_factor == pytest.approx(run.latent_scale_factor)
    assert main(["export", str(run.run_dir), str(tmp_path / "out")]) == 2  # never overwrites
