"""Never lose a run: real processes killed, terminated and resumed, and a disk that fills up.

An uninterrupted run is the reference. A run killed with SIGKILL at a random step and resumed
from its last checkpoint, and one stopped with SIGTERM and started again with the same command,
must end with the same weights and the same ``metrics.jsonl`` records (bitwise on CPU).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, tiny_config
from safetensors.torch import load_file

from ldmkit.cli import main
from ldmkit.errors import CheckpointError
from ldmkit.run import checkpoint as checkpoint_module
from ldmkit.run.checkpoint import list_checkpoints, load_checkpoint
from ldmkit.training.loop import train
from ldmkit.vitals.logs.readers import read_log

pytestmark = pytest.mark.slow

STEPS = 80
# checkpoints every 6 steps and logs every 4: a resume often starts inside a log interval
SETTINGS = {"train": {**TINY["train"], "steps": STEPS, "checkpoint_every": 6, "log_every": 4,
                      "sample_every": 40, "checkpoint_keep": 2}}


# the other kinds of run: a DiT trained by flow matching, micro-batches accumulated, a
# class-conditional UNet (exact resume of a compiled run: test_fastpath, the suite's one real
# inductor compile)
DIT_FLOW = {"model": {"type": "dit", "patch_size": 2, "hidden_size": 32, "depth": 2,
                      "num_heads": 2},
            "diffusion": {"objective": "flow", "schedule": "linear"}}
KINDS = {"dit-flow": DIT_FLOW,
         "unet-accum": {"train": {**SETTINGS["train"], "grad_accum_steps": 4}},
         # labels dropped at random each step (the training generator) and cond_gap logged
         "unet-class-conditional": {"model": {**TINY["model"], "num_classes": 10}}}


def write_config(tmp_path: Path, name: str, sections: dict | None = None) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    cfg = {**TINY, **SETTINGS, **(sections or {}), "run_dir": str(run_dir), "tensorboard": True}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, run_dir


def spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ldmkit", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    """Block until ``metrics.jsonl`` holds a loss record at ``step`` or later."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec["tag"] == "loss/total_loss" and rec["step"] >= step:
                    return
        assert proc.poll() is None, f"the run ended before step {step}"
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def records(run_dir: Path) -> list[tuple[int, str, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["tag"], r["value"]) for r in map(json.loads, lines)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{STEPS:07d}" / "weights.safetensors"))


def assert_same_run(run_dir: Path, reference: Path) -> None:
    a, b = final_weights(run_dir), final_weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    got, want = records(run_dir), records(reference)
    assert len({(s, t) for s, t, _ in got}) == len(got), "duplicated steps in metrics.jsonl"
    assert sorted(got) == sorted(want)
    # TensorBoard shows each step once too: the resumed writer purged the redone steps
    tb, tb_ref = read_log(run_dir / "tensorboard").series, read_log(reference / "tensorboard").series
    assert tb["loss/total_loss"] == tb_ref["loss/total_loss"]


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    config, run_dir = write_config(tmp, "straight")
    code, out = finish(spawn("train", str(config)))
    assert code == 0, out
    return run_dir


def straight_run(tmp_path: Path, kind: str) -> Path:
    """An uninterrupted run of one of ``KINDS``: the reference its killed twin must equal."""
    config, run_dir = write_config(tmp_path, "straight", KINDS[kind])
    code, out = finish(spawn("train", str(config)))
    assert code == 0, out
    return run_dir


# the kind whose reference the SIGTERM test shares runs on the same worker as that test
@pytest.mark.parametrize("kind", [
    pytest.param("unet-eps", marks=pytest.mark.xdist_group("preemption_reference")), *KINDS])
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tmp_path, request, kind):
    reference = (request.getfixturevalue("reference") if kind == "unet-eps" else
                 straight_run(tmp_path, kind))
    kill_at = random.Random().randint(8, STEPS - 30)
    print(f"SIGKILL once step {kill_at} is logged")
    config, run_dir = write_config(tmp_path, "killed", KINDS.get(kind))
    proc = spawn("train", str(config))
    wait_for_step(proc, run_dir, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "checkpoints" / f"step_{STEPS:07d}").exists()
    code, out = finish(spawn("train", "--resume", str(run_dir)))
    assert code == 0, out
    assert "resumed from" in out
    assert_same_run(run_dir, reference)


@pytest.mark.xdist_group("preemption_reference")
def test_sigterm_saves_exits_0_and_the_same_command_continues(tmp_path, reference):
    config, run_dir = write_config(tmp_path, "terminated")
    proc = spawn("train", str(config))
    wait_for_step(proc, run_dir, 10)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 0, out
    assert "SIGTERM: stopped after step" in out and f"--resume {run_dir}" in out
    stopped = int(out.split("SIGTERM: stopped after step ")[1].split()[0])
    assert stopped < STEPS
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == f"step_{stopped:07d}"
    code, out = finish(spawn("train", str(config)))  # the very same command
    assert code == 0, out
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:07d}" in out
    assert_same_run(run_dir, reference)


def test_sigint_during_autoencoder_training_restarts_stage_1(tmp_path):
    cfg = {**TINY, "autoencoder": {**TINY["autoencoder"], "steps": 3000}, "run_dir": str(tmp_path / "r")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = spawn("train", str(tmp_path / "c.yaml"))
    deadline = time.time() + 120
    while not (tmp_path / "r" / "metrics.jsonl").is_file() or "vae/" not in (
            tmp_path / "r" / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    code, out = finish(proc)
    assert code == 0, out
    assert "SIGINT during autoencoder training" in out and "--resume" in out
    assert not (tmp_path / "r" / "autoencoder").exists()


class FullDisk:
    """``save_file`` that fails like a full disk from its ``fail_from``-th call, after writing
    a partial file."""

    def __init__(self, fail_from: int):
        self.calls, self.fail_from = 0, fail_from
        self.real = checkpoint_module.save_file

    def __call__(self, tensors: dict, path: str) -> None:
        self.calls += 1
        if self.calls >= self.fail_from:
            Path(path).write_bytes(b"\x00" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real(tensors, path)


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = tiny_config(train={"steps": 12, "checkpoint_every": 4})
    straight = train(cfg, tmp_path / "straight")
    # calls 1-2 write the step-4 checkpoint; the step-8 save fails half-way
    monkeypatch.setattr(checkpoint_module, "save_file", FullDisk(fail_from=4))
    with pytest.raises(CheckpointError, match="No space left on device.*intact"):
        train(cfg, tmp_path / "run")
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_0000004"]
    load_checkpoint(ckpts[0])  # still loadable
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    a = load_file(str(straight.run_dir / "checkpoints/step_0000012/weights.safetensors"))
    b = load_file(str(tmp_path / "run/checkpoints/step_0000012/weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
