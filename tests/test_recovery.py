"""Divergence recovery (vitals.on_nonfinite), safe loading, and bad input that must not crash."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, tiny_config
from faults import Fault
from PIL import Image

from ldmkit.cli import main
from ldmkit.platform.fastpath import choose
from ldmkit.run.context import diagnose_path as diagnose_log
from ldmkit.training.loop import train
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.logs.metrics_jsonl import read_metrics

SRC = Path(__file__).resolve().parents[1] / "src"


class NanAt:
    """A model wrapper whose output is NaN on the given calls (counted across rollbacks)."""

    def __init__(self, calls: set[int] | None = None, always: bool = False):
        self.calls, self.always, self.n = calls or set(), always, 0

    def __call__(self, model, eps):
        def forward(x, t):
            self.n += 1
            out = model(x, t)
            return out * float("nan") if self.always or self.n in self.calls else out
        return forward


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "findings.jsonl").read_text().splitlines()]


def test_rollback_restores_the_last_checkpoint_with_a_lower_lr(tmp_path, tiny_run):
    cfg = tiny_config(vitals={"on_nonfinite": "rollback"})
    result = train(cfg, tmp_path / "run", param=Fault(eps_model=NanAt({7})))
    assert result.step == 12 and result.stopped_by is None
    (event,) = [e for e in events(tmp_path / "run") if e["code"] == "nonfinite_rollback"]
    assert event["step"] == 7 and event["at_step"] == 4 and event["severity"] == "warning"
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    keys = [(r["step"], r["tag"]) for r in recs]
    assert len(keys) == len(set(keys)), "a rollback must not leave duplicated steps"
    lrs = {r["step"]: r["value"] for r in recs if r["tag"] == vm.LEARNING_RATE}
    scales = {r["step"]: r["value"] for r in recs if r["tag"] == vm.LR_SCALE}
    assert scales == {8: 0.5, 12: 0.5}
    assert lrs[8] == pytest.approx(0.5 * _lr(tiny_run.run_dir, 8))  # tiny_config() unchanged
    assert all(torch.isfinite(torch.tensor(r["value"])) for r in recs)
    # the diagnosis knows the scale is deliberate: no lr_mismatch
    assert "lr_mismatch" not in {f.code for f in diagnose_log(tmp_path / "run").findings}


def _lr(run_dir: Path, step: int) -> float:
    recs = read_metrics(run_dir / "metrics.jsonl")
    return next(r["value"] for r in recs if r["tag"] == vm.LEARNING_RATE and r["step"] == step)


def test_rollbacks_give_up_after_max_rollbacks_with_a_diagnosis(tmp_path):
    cfg = tiny_config(vitals={"on_nonfinite": "rollback", "max_rollbacks": 2})
    result = train(cfg, tmp_path / "run", param=Fault(eps_model=NanAt(always=True)))
    assert result.stopped_by.code == "rollback_exhausted" and result.scenario == "diverged"
    codes = [e["code"] for e in events(tmp_path / "run")]
    assert codes.count("nonfinite_rollback") == 2 and codes[-1] == "rollback_exhausted"
    assert "train.lr" in result.stopped_by.fix


def test_on_nonfinite_stop_goes_back_before_the_divergence_and_stops(tmp_path):
    cfg = tiny_config(vitals={"on_nonfinite": "stop"})
    result = train(cfg, tmp_path / "run", param=Fault(eps_model=NanAt({5})))
    assert result.stopped_by.code == "nonfinite_stop" and result.step == 4
    assert result.scenario == "diverged"
    # the weights of step 4 produced the non-finite step 5: kept aside, never resumed from
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "diverged" / "step_0000004" / "meta.json").is_file()
    assert [p.name for p in ckpts.glob("step_*")] == ["step_0000000"]
    assert [e["code"] for e in events(tmp_path / "run")][-1] == "nonfinite_stop"
    losses = {r["step"]: r["value"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
              if r["tag"] == vm.LOSS}
    assert losses[4] < 2 and not torch.isfinite(torch.tensor(losses[5]))


def test_a_malicious_pickle_in_place_of_a_checkpoint_is_never_executed(tmp_path, capsys):
    run = train(tiny_config(train={"steps": 4}), tmp_path / "run")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    ckpt = run.run_dir / "checkpoints" / "step_0000004"
    (ckpt / "weights.safetensors").write_bytes(pickle.dumps({"model.x": Exploit()}))
    assert main(["sample", str(run.run_dir), "--num", "2", "--steps", "2"]) == 2
    assert "unreadable" in capsys.readouterr().err
    (run.run_dir / "autoencoder" / "weights.safetensors").write_bytes(pickle.dumps(Exploit()))
    assert main(["train", "--resume", str(run.run_dir)]) == 2
    assert not marker.exists()


def test_no_torch_load_without_weights_only():
    calls = [(p, line) for p in SRC.rglob("*.py") for line in p.read_text().splitlines()
             if re.search(r"torch\.load\(|pickle\.loads?\(", line)]
    assert all("weights_only=True" in line for _, line in calls), calls


def _folder(tmp_path: Path, images: dict[str, bytes]) -> Path:
    for name, content in images.items():
        (tmp_path / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "imgs" / name).write_bytes(content)
    return tmp_path / "imgs"


def _run_dir_after(tmp_path: Path) -> Path:
    train(tiny_config(train={"steps": 4}), tmp_path / "run")
    return tmp_path / "run"


BAD_CONFIGS = [
    ({"train": {"lr": -1e-3}}, "train.lr' must be > 0.0"),
    ({"train": {"grad_clip": 0}}, "train.grad_clip' must be > 0.0"),
    ({"train": {"log_every": 0}}, "train.log_every' must be >= 1"),
    ({"train": {"log_every": "often"}}, "train.log_every' must be int"),
    ({"trian": {"lr": 1e-3}}, "unknown config key 'trian'"),
    ({"vitals": {"on_nonfinite": "ignore"}}, "vitals.on_nonfinite' must be one of"),
    ({"data": {"source": "folder", "path": "/no/such/dir"}}, "/no/such/dir"),
]


@pytest.mark.parametrize("sections, needle", BAD_CONFIGS, ids=[n for _, n in BAD_CONFIGS])
def test_bad_config_values_exit_2_with_one_line(tmp_path, capsys, sections, needle):
    cfg = {**TINY, **{k: {**TINY.get(k, {}), **v} for k, v in sections.items()},
           "run_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_truncated_checkpoint_and_incompatible_config_exit_2_and_touch_nothing(tmp_path, capsys):
    run_dir = _run_dir_after(tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["train", "--resume", str(run_dir), "--set", "model.base_channels=24",
                 "--set", "train.steps=8"]) == 2
    assert "cannot change model.base_channels when resuming" in capsys.readouterr().err
    weights = run_dir / "checkpoints" / "step_0000004" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before[weights] = weights.read_bytes()
    assert main(["train", "--resume", str(run_dir), "--set", "train.steps=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unreadable" in err and len(err.splitlines()) == 1
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


def test_folder_of_mixed_modes_sizes_and_broken_files_trains(tmp_path, capsys):
    import io

    def png(mode: str, size: tuple[int, int], color) -> bytes:
        buf = io.BytesIO()
        Image.new(mode, size, color).save(buf, format="PNG")
        return buf.getvalue()

    good = {f"a/{i}_rgb.png": png("RGB", (20 + i, 31), (i * 20, 40, 90)) for i in range(6)}
    good |= {f"b/{i}_l.png": png("L", (16, 16 + i), i * 30) for i in range(6)}
    good |= {f"c/{i}_rgba.png": png("RGBA", (40, 12), (200, 10, i * 30, 128)) for i in range(6)}
    good |= {f"d/{i}_p.png": png("P", (18, 18), i) for i in range(6)}
    bad = {"broken.png": b"\x89PNG\r\n\x1a\nbroken", "truncated.png": png("L", (16, 16), 0)[:40],
           "empty.jpg": b""}
    folder = _folder(tmp_path, {**good, **bad})
    cfg = tiny_config(data={"source": "folder", "path": str(folder), "limit": None,
                            "channels": 3}, train={"steps": 4})
    result = train(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    assert result.step == 4
    assert "skipped 3 unreadable images" in out


def test_a_nan_from_one_module_is_traced_to_that_module(tmp_path, monkeypatch):
    from ldmkit.models import layers, unet

    attention, build = layers.SelfAttention.forward, unet.UNet.__init__

    def poisoned(self, x):
        out = attention(self, x)
        return out * float("nan") if getattr(self, "poisoned", False) else out

    def build_and_poison(self, *args, **kwargs):
        build(self, *args, **kwargs)
        self.mid[0].attn.poisoned = True  # the planted fault: one layer's forward

    monkeypatch.setattr(layers.SelfAttention, "forward", poisoned)
    monkeypatch.setattr(unet.UNet, "__init__", build_and_poison)
    cfg = tiny_config(train={"steps": 4, "sample_every": 100})
    train(cfg, tmp_path / "run")
    (origin,) = [e for e in events(tmp_path / "run") if e["code"].startswith("nonfinite_")]
    assert origin["code"] == "nonfinite_forward" and origin["step"] == 1
    # the message names the precision the step ran in: auto's choice on this machine
    bf16 = choose(cfg.train.precision, False, torch.device("cpu"), "train", 4).bf16
    assert "'mid.0.attn'" in origin["message"]
    assert ("bf16 autocast" if bf16 else "(finite inputs, non-finite output; fp32)") \
        in origin["message"]


def test_a_nan_in_the_data_is_traced_to_its_dataset_index(tmp_path):
    import numpy as np

    run = tmp_path / "run"
    train(tiny_config(train={"steps": 2, "sample_every": 100}), run)
    mean = np.load(run / "latents" / "mean.npy", mmap_mode="r+")
    mean[7] = np.nan  # one image's latents
    mean.flush()
    del mean
    cfg = tiny_config(train={"steps": 20, "sample_every": 100})
    result = train(cfg, run, resume=True)
    origins = [e for e in events(run) if e["code"].startswith("nonfinite_")]
    assert origins and all(e["code"] == "nonfinite_batch" for e in origins)
    assert "dataset indices [7]" in origins[0]["message"]
    assert result.step == 20  # skipped, never applied


def test_a_nan_in_one_image_of_a_folder_is_traced_to_that_file(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(40):  # two class folders of small random images
        folder = tmp_path / "images" / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    data = {"source": "folder", "path": str(tmp_path / "images"), "limit": None}
    run = tmp_path / "run"
    train(tiny_config(data=data, train={"steps": 2, "sample_every": 100}), run)
    names = json.loads((run / "latents" / "meta.json").read_text())["names"]
    row = names.index("cats/07.png")
    mean = np.load(run / "latents" / "mean.npy", mmap_mode="r+")
    mean[row] = np.nan  # one image's latents
    mean.flush()
    del mean
    train(tiny_config(data=data, train={"steps": 12, "sample_every": 100}), run, resume=True)
    origins = [e for e in events(run) if e["code"].startswith("nonfinite_")]
    assert origins and all(e["code"] == "nonfinite_batch" for e in origins)
    assert "images 'cats/07.png' hold non-finite latents" in origins[0]["message"]
