"""torchrun + DDP on 2 CPU processes (gloo): the same run as 1 process with the same global batch,
a DDP resume, and the latent cache that is rebuilt when the autoencoder changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, tiny_config
from safetensors.torch import load_file

from ldmkit.training.loop import train
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.logs.metrics_jsonl import read_metrics
from ldmkit.vitals.signs import TRAIN_TAGS

pytestmark = pytest.mark.slow

STEPS = 12
GLOBAL = {**TINY, "train": {**TINY["train"], "steps": STEPS, "batch_size": 16},
          "sample": {**TINY["sample"], "num": 8, "during_training_num": 4}}


def torchrun(nproc: int, *args: str, timeout: float = 400) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "ldmkit", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def write(tmp_path: Path, name: str, **extra) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    cfg = {**GLOBAL, **extra, "run_dir": str(run_dir)}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / f"{name}.yaml", run_dir


@pytest.fixture(scope="session")
def shared_ae(tmp_path_factory) -> str:
    """One stage 1 for all runs, so the comparison is about stage 2 alone."""
    path = tmp_path_factory.mktemp("ae") / "ae"
    train(tiny_config(train={"steps": 1}), path)
    return str(path)


def by_key(run_dir: Path) -> dict[tuple[int, str], float]:
    return {(r["step"], r["tag"]): r["value"] for r in read_metrics(run_dir / "metrics.jsonl")}


def weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:07d}" / "weights.safetensors"))


def test_two_processes_log_the_same_vitals_as_one(tmp_path, shared_ae):
    """Also with a v objective (loss/eps_mse is reduced too), class labels (dropped at random,
    sharded with the batch, conditioning/cond_gap) and, in the 2-process run, 2 micro-batches
    per process (the same steps: batch_size is the step's batch). In fp32: equal to float
    summation order (bf16 rounds each shard's products differently; the DDP resume below runs
    on the auto settings)."""
    ae = {**GLOBAL["autoencoder"], "pretrained": shared_ae}
    v, model = {"objective": "v"}, {**GLOBAL["model"], "num_classes": 10}
    sample = {**GLOBAL["sample"], "num": 20}  # two of each class: the within-class diversity
    fp32 = {**GLOBAL["train"], "precision": "fp32"}
    cfg1, run1 = write(tmp_path, "one", autoencoder=ae, diffusion=v, model=model, sample=sample,
                       train=fp32)
    cfg2, run2 = write(tmp_path, "two", autoencoder=ae, diffusion=v, model=model, sample=sample,
                       train={**fp32, "grad_accum_steps": 2})
    torchrun(1, "train", str(cfg1))
    out = torchrun(2, "train", str(cfg2))
    assert "2 processes" in out
    one, two = by_key(run1), by_key(run2)
    assert one.keys() == two.keys()  # rank 0 alone writes, once per step
    tags = {tag for _, tag in one}
    assert set(TRAIN_TAGS) <= tags and {vm.PAIRWISE_PREFIX + "mean", vm.EPS_MSE} <= tags
    assert {vm.COND_GAP, vm.WITHIN_CLASS} <= tags
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=2e-3, abs=1e-5), key
    # Adam normalises each update, so near-zero parameters can move by ~lr on reduction-order
    # noise: compare the weights as one vector
    a, b = weights(run1), weights(run2)
    va, vb = (torch.cat([w[k].flatten() for k in sorted(a)]) for w in (a, b))
    assert ((va - vb).norm() / va.norm()).item() < 1e-3
    assert not (run2 / "checkpoints").with_name("rank1").exists()
    assert len(list(run2.rglob("findings.jsonl"))) <= 1


def test_two_processes_log_the_same_vitals_as_one_for_captions(tmp_path, shared_ae):
    """A text-conditional run (captions dropped at random, sharded with the batch, prompts per
    grid column, within-prompt diversity) logs the same records on 2 processes as on 1."""
    from test_text import TEXT_MODEL, digits_folder

    folder = digits_folder(tmp_path / "captioned", 128)
    ae = {**GLOBAL["autoencoder"], "pretrained": shared_ae}
    data = {"source": "folder", "path": str(folder), "image_size": 16, "val_fraction": 0.05}
    model = {**GLOBAL["model"], **TEXT_MODEL, "text_width": 32}
    sample = {**GLOBAL["sample"], "num": 16}
    fp32 = {**GLOBAL["train"], "precision": "fp32"}
    runs = [write(tmp_path, name, autoencoder=ae, data=data, model=model, sample=sample,
                  train=fp32) for name in ("one", "two")]
    torchrun(1, "train", str(runs[0][0]))
    torchrun(2, "train", str(runs[1][0]))
    one, two = by_key(runs[0][1]), by_key(runs[1][1])
    assert one.keys() == two.keys()
    assert {vm.COND_GAP, vm.WITHIN_PROMPT, vm.VAL_LOSS} <= {tag for _, tag in one}
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=2e-3, abs=1e-5), key
    assert (runs[1][1] / "prompts.json").read_text() == (runs[0][1] / "prompts.json").read_text()


def test_ddp_resume_continues_to_the_same_weights(tmp_path, shared_ae):
    """On the default (auto) settings: bf16 autocast where this CPU has it, eager (auto does
    not compile training), the choice printed by every run."""
    ae = {**GLOBAL["autoencoder"], "pretrained": shared_ae}
    cfg_a, run_a = write(tmp_path, "straight", autoencoder=ae)
    cfg_b, run_b = write(tmp_path, "split", autoencoder=ae)
    torchrun(2, "train", str(cfg_a))
    torchrun(2, "train", str(cfg_b), "--until", "6")
    assert not (run_b / "checkpoints" / f"step_{STEPS:07d}").exists()
    out = torchrun(2, "train", "--resume", str(run_b))
    assert "resumed from" in out and "fast path (train): " in out
    a, b = weights(run_a), weights(run_b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    keys = [(r["step"], r["tag"]) for r in read_metrics(run_b / "metrics.jsonl")]
    assert len(keys) == len(set(keys))


def test_latent_cache_is_reused_and_rebuilt_when_the_autoencoder_changes(tmp_path, capsys):
    cache = tmp_path / "cache"
    first = train(tiny_config(train={"steps": 2}, data={**TINY["data"], "latent_cache": str(cache)}),
                  tmp_path / "a")
    out = capsys.readouterr().out
    assert "latent cache: encoding" in out
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["shape"][0] == TINY["data"]["limit"]
    # the same autoencoder: reused, and the dataset is not even loaded
    cfg = tiny_config(train={"steps": 2}, data={**TINY["data"], "latent_cache": str(cache)},
                      autoencoder={**TINY["autoencoder"], "pretrained": str(first.run_dir)})
    train(cfg, tmp_path / "b")
    out = capsys.readouterr().out
    assert "latent cache: reusing" in out and "images from" not in out
    # another autoencoder (other seed): the hash differs, the cache is rebuilt
    other = train(tiny_config(seed=1, train={"steps": 1}), tmp_path / "other")
    cfg = tiny_config(train={"steps": 2}, data={**TINY["data"], "latent_cache": str(cache)},
                      autoencoder={**TINY["autoencoder"], "pretrained": str(other.run_dir)})
    train(cfg, tmp_path / "c")
    assert "latent cache: encoding" in capsys.readouterr().out
    assert json.loads((cache / "meta.json").read_text())["autoencoder_sha256"] != meta[
        "autoencoder_sha256"]


def test_encode_command_builds_the_cache_of_a_run(tmp_path, capsys):
    from ldmkit.cli import main

    run = train(tiny_config(train={"steps": 1}, data={**TINY["data"], "latent_cache": "off"}),
                tmp_path / "run")
    assert not (run.run_dir / "latents").exists()
    assert main(["encode", str(run.run_dir)]) == 0
    assert (run.run_dir / "latents" / "mean.npy").is_file()
    assert main(["encode", str(run.run_dir)]) == 0
    assert "latent cache: reusing" in capsys.readouterr().out
