"""The deterministic validation loss: a fixed held-out split and fixed points, stored in the run,
the same values after a resume, held-out images never trained on; and what the report and
`ldmkit watch` show of it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import SHARED_DATA, tiny_config
from rich.console import Console
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ldmkit.config import load_config, to_dict
from ldmkit.report.html import noise_level_map
from ldmkit.report.watch import watch
from ldmkit.run.layout import RunDir
from ldmkit.training import held_out
from ldmkit.training.loop import train
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.logs.metrics_jsonl import read_metrics


def validation_records(run_dir) -> dict[tuple[int, str], float]:
    return {(r["step"], r["tag"]): r["value"] for r in read_metrics(run_dir / "metrics.jsonl")
            if r["tag"].startswith(("validation/", "validation_ema/"))}


def test_split_holds_out_a_fixed_capped_share_disjoint_from_training():
    cfg = tiny_config(data={"val_fraction": 0.02, "val_max": 15})
    parts = held_out.split(1000, cfg)
    assert len(parts.held_out) == 15  # 2 % of 1000 = 20, capped by val_max
    assert set(parts.held_out.tolist()).isdisjoint(parts.train.tolist())
    assert sorted(parts.held_out.tolist() + parts.train.tolist()) == list(range(1000))
    assert torch.equal(held_out.split(1000, cfg).held_out, parts.held_out)
    assert len(held_out.split(1000, tiny_config(data={"val_fraction": 0.0})).held_out) == 0
    # what --resume may change (train.*) never changes which images are trained on
    assert torch.equal(held_out.split(1000, tiny_config(
        data={"val_fraction": 0.02, "val_max": 15}, train={"val_every": 0})).held_out,
        parts.held_out)
    assert len(held_out.split(10, cfg).held_out) == 0  # 2 % of 10 images is none


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="needs ../shared/data/mnist")
def test_an_idx_test_file_is_the_validation_set_and_nothing_is_held_out():
    cfg = tiny_config(data={"source": "idx", "path": str(SHARED_DATA / "mnist")})
    assert held_out.test_images_path(cfg.data).name.startswith("t10k-images")
    assert len(held_out.split(60000, cfg).held_out) == 0


@pytest.mark.slow
def test_validation_is_the_same_after_a_resume_and_never_trains_on_held_out_images(tmp_path):
    cfg = tiny_config(train={"steps": 12, "val_every": 4, "sample_every": 100})
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "sliced", stop_at=6)
    train(cfg, tmp_path / "sliced", resume=True)
    straight = validation_records(tmp_path / "straight")
    assert straight == validation_records(tmp_path / "sliced")  # bitwise: same points, weights
    steps = sorted({s for s, _ in straight})
    assert steps == [0, 4, 8, 12]
    tags = {t for _, t in straight}
    assert {vm.VAL_LOSS, vm.VAL_TRAIN_LOSS, vm.VAL_PREFIX + "eps_mse",
            vm.VAL_PREFIX + "cos_eps_mean", vm.VAL_EMA_PREFIX + "loss"} <= tags
    assert {f"{vm.VAL_PREFIX}loss_t{k}" for k in range(vm.VAL_BUCKETS)} <= tags
    assert straight[(12, vm.VAL_LOSS)] < straight[(0, vm.VAL_LOSS)]
    # a NaN planted in a held-out image's cached latents: training never draws it
    run = tmp_path / "straight"
    held = load_bytes(RunDir(run).validation.read_bytes())["held_out"].tolist()
    assert len(held) == 5
    mean = np.load(run / "latents" / "mean.npy", mmap_mode="r+")
    mean[held] = np.nan
    mean.flush()
    del mean
    result = train(tiny_config(train={"steps": 40, "val_every": 4, "sample_every": 100}), run,
                   resume=True)
    assert result.step == 40
    nonfinite = [r for r in read_metrics(run / "metrics.jsonl") if r["tag"] == vm.NONFINITE_STEPS]
    assert nonfinite and all(r["value"] == 0 for r in nonfinite)
    assert np.isfinite(validation_records(run)[(40, vm.VAL_LOSS)])  # the stored points


def test_a_damaged_validation_file_is_drawn_again_identically(tmp_path, capsys):
    cfg = tiny_config(train={"steps": 4, "val_every": 4, "sample_every": 100})
    train(cfg, tmp_path / "run")
    path = RunDir(tmp_path / "run").validation
    before = load_bytes(path.read_bytes())
    path.write_bytes(path.read_bytes()[:100])
    train(tiny_config(train={"steps": 8, "val_every": 4, "sample_every": 100}), tmp_path / "run",
          resume=True)
    after = load_bytes(path.read_bytes())
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    # the right shapes, wrong contents: labels out of range, timesteps outside [0, 1], a dtype
    tampered = {**after, "labels": after["labels"] + 1000, "t": after["t"] * 5,
                "eps": after["eps"].double()}
    path.write_bytes(save_bytes(tampered, {"version": held_out.VERSION}))
    capsys.readouterr()
    train(tiny_config(train={"steps": 12, "val_every": 4, "sample_every": 100}),
          tmp_path / "run", resume=True)
    assert "is not the set drawn for this run's split" in capsys.readouterr().out
    again = load_bytes(path.read_bytes())
    assert all(torch.equal(again[k], before[k]) and again[k].dtype == before[k].dtype
               for k in before)
    losses = [v for (step, tag), v in validation_records(tmp_path / "run").items()
              if tag == vm.VAL_LOSS and step == 12]
    assert len(losses) == 1 and np.isfinite(losses[0])


def _posteriors(names: list[str] | None, n: int = 50):
    from ldmkit.data.stage1 import LatentPosteriors

    return LatentPosteriors(torch.zeros(n, 1, 2, 2), torch.zeros(n, 1, 2, 2), names)


def test_a_runs_split_is_kept_by_file_when_its_folder_changes(tmp_path, capsys):
    """Deleting one held-out image must not re-split the data: the other held-out images stay
    held out (by file, not by row), the new ones are trained on, and the run says so."""
    cfg = tiny_config(data={"val_fraction": 0.1})
    names = [f"img{i:03d}.png" for i in range(50)]
    first = held_out.run_split(cfg, tmp_path, _posteriors(names))
    held = [names[i] for i in first.held_out.tolist()]
    assert len(held) == 5 and RunDir(tmp_path).split_file.is_file()
    assert torch.equal(held_out.run_split(cfg, tmp_path, _posteriors(names)).held_out,
                       first.held_out)
    changed = [n for n in names if n != held[0]] + ["new1.png", "new2.png"]
    changed.sort()
    again = held_out.run_split(cfg, tmp_path, _posteriors(changed, len(changed)))
    assert sorted(changed[i] for i in again.held_out.tolist()) == sorted(held[1:])
    assert set(again.train.tolist()) | set(again.held_out.tolist()) == set(range(len(changed)))
    assert "the held-out split is kept by file: 4 of its 5 images remain held out" in \
        capsys.readouterr().out


def test_a_changed_dataset_without_file_names_is_refused_and_a_damaged_split_too(tmp_path):
    from ldmkit.errors import DataError

    cfg = tiny_config(data={"val_fraction": 0.1})
    held_out.run_split(cfg, tmp_path, _posteriors(None))
    with pytest.raises(DataError, match="changed since the run started .50 images, now 49"):
        held_out.run_split(cfg, tmp_path, _posteriors(None, 49))
    RunDir(tmp_path).split_file.write_text('{"size": 50, "held_out": [70], "held_out_names": null}')
    with pytest.raises(DataError, match="split.json' is damaged"):
        held_out.run_split(cfg, tmp_path, _posteriors(None))


def test_a_run_saved_before_validation_keeps_training_on_every_image(tmp_path):
    text = tmp_path / "config.yaml"
    old = to_dict(tiny_config())
    del old["data"]["val_fraction"]  # what a run saved before validation existed holds
    text.write_text(yaml.safe_dump(old))
    assert RunDir(tmp_path).load_config().data.val_fraction == 0.0
    assert load_config(text).data.val_fraction == 0.02  # a new experiment file: the default


def test_report_and_watch_show_the_loss_per_noise_level(tmp_path):
    with (tmp_path / "metrics.jsonl").open("w") as fh:
        for step in (0, 250, 500):
            for k in range(vm.VAL_BUCKETS):
                value = 1.0 if k >= 5 or step == 0 else 0.3
                fh.write(json.dumps({"step": step, "tag": f"{vm.VAL_PREFIX}loss_t{k}",
                                     "value": value}) + "\n")
    series = {f"{vm.VAL_PREFIX}loss_t{k}": [(s, 1.0 if k >= 5 or s == 0 else 0.3)
                                           for s in (0, 250, 500)] for k in range(10)}
    svg = noise_level_map(series)
    assert svg.count("<rect class=\"series\"") == 30
    assert "#ffffff" in svg and "t 0.9-1.0 step 500: loss 1" in svg  # stuck levels stay white
    console = Console(record=True, width=200)
    watch(tmp_path, once=True, console=console)
    text = console.export_text()
    assert "validation loss per noise level" in text and "t 0.9-1.0 ███ 1" in text


def raised(run_dir) -> set[str]:
    lines = (run_dir / "findings.jsonl").read_text().splitlines() \
        if (run_dir / "findings.jsonl").is_file() else []
    return {e["code"] for e in map(json.loads, lines) if e.get("event") == "raised"}


LONG = {"steps": 600, "val_every": 100, "sample_every": 200, "log_every": 20, "batch_size": 32,
        "lr": 2e-3, "min_lr_ratio": 1.0, "warmup_steps": 20, "checkpoint_every": 1000}
SAMPLES = {"num": 16, "during_training_num": 16}


@pytest.mark.slow
def test_two_images_trained_long_overfit_and_are_copied_and_a_healthy_run_is_not(tmp_path):
    """Measured: held-out loss 47 % above the training images', 44 % of samples copies (median
    nearest / second-nearest 0.36) at steps 400 and 600; the healthy run: none of it."""
    few = tiny_config(data={"limit": 4, "val_fraction": 0.5}, model={"base_channels": 32},
                      autoencoder={"steps": 60}, train=LONG, sample=SAMPLES)
    result = train(few, tmp_path / "few")
    assert {"overfitting", "memorization"} <= raised(tmp_path / "few")
    assert result.scenario == "memorization"
    messages = {f.code: f.message for f in result.findings}
    assert "above the same noise on training images" in messages["overfitting"]
    assert "of the samples are copies of training images" in messages["memorization"]
    healthy = train(tiny_config(model={"base_channels": 32}, autoencoder={"steps": 60},
                                train=LONG, sample=SAMPLES), tmp_path / "healthy")
    new = {"overfitting", "validation_stuck", "memorization", "memorization_rising"}
    assert not raised(tmp_path / "healthy") & new  # (its 4-step samples are judged as usual)
    assert healthy.step == 600


def test_samples_that_copy_training_images_raise_memorization(tmp_path, monkeypatch):
    """The wiring, with samples planted as exact copies of the training images as the decoder
    renders them, from the first sampling on."""
    from ldmkit.sampling.generate import generate
    from ldmkit.training import outputs as train_module

    def copying(model, ae, scale, cfg, num, *args, **kwargs):
        samples = generate(model, ae, scale, cfg, num, *args, **kwargs)
        run = tmp_path / "run"
        train_index = held_out.split(256, cfg).train
        mean = torch.from_numpy(np.load(run / "latents" / "mean.npy"))[train_index[:num]]
        samples.images = ((ae.decode(mean).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return samples

    monkeypatch.setattr(train_module, "generate", copying)
    cfg = tiny_config(train={"steps": 12, "sample_every": 6},
                      vitals={"thresholds": {"min_steps": 0, "loss_stuck_high": 2.0,
                                             "cos_eps_random": -1.0}})
    result = train(cfg, tmp_path / "run")
    copies = [r["value"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
              if r["tag"] == vm.COPY_SHARE]
    assert copies and all(v == 1.0 for v in copies)
    assert "memorization" in raised(tmp_path / "run")
    assert result.scenario == "memorization"
