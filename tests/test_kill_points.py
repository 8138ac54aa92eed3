"""Resume is exact wherever the process dies: killed (SIGKILL) or stopped (SIGTERM) inside
stage 1, while encoding the dataset, during the first validation, during a sampling or an
evaluation in training, then resumed, a run ends with the weights, generator state and every
``metrics.jsonl`` record of a run never interrupted (bitwise on CPU). So does a run that
repaired itself during training (the forecast's remedy), killed after the repair and resumed
from a checkpoint before it: it repairs again at the same step, and records the repair once.

The signal is sent from inside the process at an exact point: a test-only driver wraps the
function that does that work so that its n-th call signals the process first (the production
code knows nothing of it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY
from safetensors.torch import load_file

from ldmkit.run.layout import RunDir

pytestmark = pytest.mark.slow

STEPS = 8
CONFIG = {**TINY, "autoencoder": {**TINY["autoencoder"], "steps": 12},
          "data": {**TINY["data"], "val_fraction": 0.05},
          "train": {**TINY["train"], "steps": STEPS, "checkpoint_every": 4, "log_every": 2,
                    "sample_every": 4, "eval_every": 4, "val_every": 4},
          "sample": {**TINY["sample"], "num": 4}}
DRIVER = """
import importlib, os, signal, sys
module, attr, nth, sig = sys.argv[1:5]
owner = importlib.import_module(module)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
original, calls = getattr(owner, name), [0]
def planted(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(nth):
        os.kill(os.getpid(), getattr(signal, sig))
    return original(*args, **kwargs)
setattr(owner, name, planted)
from ldmkit.cli import main
sys.exit(main(sys.argv[5:]))
"""
# where the signal is sent: (module, attribute, which call)
POINTS = {
    "inside-stage-1": ("ldmkit.data.stage1", "_autoencoder_step", 6),
    "encoding": ("ldmkit.data.latents", "encode_batches", 1),
    "first-validation": ("ldmkit.training.held_out", "measure", 1),
    "sampling": ("ldmkit.training.outputs", "generate", 1),
    "evaluation": ("ldmkit.sampling.evaluate", "InLoopEval.measure", 1),
}


def run(args: list[str], point: tuple[str, str, int] | None = None, signal: str = "SIGKILL"
        ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable, "-c", DRIVER, *map(str, point), signal] if point else \
        [sys.executable, "-m", "ldmkit"]
    return subprocess.run([*prefix, *args], env=env, text=True, capture_output=True,
                          timeout=600)


def config(tmp_path: Path, name: str) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "run_dir": str(run_dir)}))
    return path, run_dir


def records(run_dir: Path) -> list[tuple[int, str, float]]:
    lines = RunDir(run_dir).metrics.read_text().splitlines()
    return sorted((r["step"], r["tag"], r["value"]) for r in map(json.loads, lines))


def final(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    ckpt = RunDir(run_dir).checkpoints / f"step_{STEPS:07d}"
    return (load_file(str(ckpt / "weights.safetensors")),
            {k: v for k, v in load_file(str(ckpt / "training.safetensors")).items()
             if k.startswith("rng.")})


# a learning rate that ramps to 5 within the run: the forecast warns at step 5, and under
# on_warning: repair the run goes on at a tenth of it (tests/test_forecast.py)
REPAIRED = {"train": {**CONFIG["train"], "lr": 5.0, "warmup_steps": 40, "grad_clip": 1e9},
            "vitals": {"on_warning": "repair"}}


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Path:
    path, run_dir = config(tmp_path_factory.mktemp("kill-reference"), "straight")
    done = run(["train", str(path)])
    assert done.returncode == 0, done.stdout + done.stderr
    return run_dir


def assert_same_end(run_dir: Path, reference: Path) -> None:
    (weights, rng), (want_weights, want_rng) = final(run_dir), final(reference)
    assert weights.keys() == want_weights.keys()
    assert all(torch.equal(weights[k], want_weights[k]) for k in weights), "weights differ"
    assert all(torch.equal(rng[k], want_rng[k]) for k in want_rng), "generator state differs"
    got, want = records(run_dir), records(reference)
    assert len({(s, t) for s, t, _ in got}) == len(got), "a record was written twice"
    assert [r[:2] for r in got] == [r[:2] for r in want], "records are missing or extra"
    assert got == want


@pytest.mark.parametrize("where, signal", [
    *[(point, "SIGKILL") for point in POINTS], ("sampling", "SIGTERM"), ("evaluation", "SIGTERM")])
def test_a_run_interrupted_anywhere_resumes_to_the_same_end(tmp_path, uninterrupted, where,
                                                            signal):
    path, run_dir = config(tmp_path, "interrupted")
    first = run(["train", str(path)], POINTS[where], signal)
    assert first.returncode == (-9 if signal == "SIGKILL" else 0), first.stdout + first.stderr
    assert not (RunDir(run_dir).checkpoints / f"step_{STEPS:07d}").exists()
    resumed = run(["train", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_end(run_dir, uninterrupted)


def test_a_run_killed_after_repairing_itself_resumes_to_the_same_end(tmp_path):
    def repaired(name: str) -> tuple[Path, Path]:
        path, run_dir = config(tmp_path, name)
        path.write_text(yaml.safe_dump({**CONFIG, **REPAIRED, "run_dir": str(run_dir)}))
        return path, run_dir

    path, reference = repaired("straight")
    assert run(["train", str(path)]).returncode == 0
    path, run_dir = repaired("interrupted")
    # the second checkpoint (step 8) is never written: resumed from step 4, before the repair
    killed = run(["train", str(path)], ("ldmkit.training.loop", "save_state", 2))
    assert killed.returncode == -9 and "repair" in RunDir(run_dir).changes.read_text()
    resumed = run(["train", "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_end(run_dir, reference)
    changes = [json.loads(line) for line in RunDir(run_dir).changes.read_text().splitlines()]
    want = [json.loads(line) for line in RunDir(reference).changes.read_text().splitlines()]
    assert [c for c in changes if c.get("live")] == want
    assert [(c["fix"], c["at_step"], c["changes"]) for c in want] == \
        [(["divergence_ahead"], 5, {"train.lr": 0.001})]
