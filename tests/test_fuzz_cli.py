"""The whole command line under random input: random config values, and random damage to the
files of a run directory. Every outcome is a result or ldmkit's one-line error with exit code 2
(never a traceback), and no file outside the run changes."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import string
import subprocess
import typing
from pathlib import Path

import pytest
import yaml
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldmkit.cli import main
from ldmkit.config import Config
from ldmkit.run.layout import RunDir
from ldmkit.training.loop import train

pytestmark = pytest.mark.slow
SETTINGS = settings(max_examples=int(os.environ.get("LDMKIT_FUZZ_EXAMPLES", 120)), deadline=None,
                    derandomize=not os.environ.get("LDMKIT_FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
QUICK = {**TINY, "data": {**TINY["data"], "limit": 64},
         "autoencoder": {**TINY["autoencoder"], "steps": 2, "calibration_batches": 1},
         "train": {**TINY["train"], "steps": 3, "log_every": 1, "sample_every": 2,
                   "checkpoint_every": 2},
         "sample": {"num": 2, "steps": 1, "during_training_num": 2}}
PATH_KEYS = {"run_dir", "data.path", "data.latent_cache", "autoencoder.pretrained"}


def _keys(cls: type = Config, prefix: str = "") -> list[tuple[str, typing.Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _keys(hints[f.name], prefix + f.name + ".")
        else:
            out.append((prefix + f.name, hints[f.name]))
    return out


KEYS = [(k, tp) for k, tp in _keys() if k not in PATH_KEYS]
hostile = (st.none() | st.booleans() | st.integers(-2, 12) | st.sampled_from([0, 16, 32, 64])
           | st.floats(allow_nan=True, allow_infinity=True, width=32)
           | st.sampled_from([1e-3, 0.5, 1e6, -1.0, "1e-4", "auto", "cuda", "banana", "fp32",
                              "bf16", "ddim", "dpmpp_2m", "folder", "idx", "stop", "rollback"])
           | st.text(string.printable, max_size=8)
           | st.lists(st.integers(-1, 8), max_size=4) | st.lists(st.floats(width=16), max_size=3)
           | st.dictionaries(st.sampled_from(["loss_stuck_high", "window", "x"]),
                             st.floats(width=16), max_size=2))


def _snapshot(root: Path, skip: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and skip not in p.parents}


class Hang(Exception):
    pass


def _hang(signum, frame):
    raise Hang


def _run_cli(argv: list[str], timeout: int = 0) -> tuple[int, str]:
    """The command's exit code and stderr; with ``timeout``, a command still running after it
    (blocked on a FIFO, say) fails the test instead of hanging the suite."""
    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, _hang)
    signal.alarm(timeout)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except Hang:
        pytest.fail(f"ldmkit {' '.join(argv)} still ran after {timeout} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


def _check_outcome(code: int, err: str) -> None:
    assert code in (0, 1, 2), (code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("ldmkit: error:")]
        assert len(lines) == 1 and len(lines[0]) < 2000, err


def _neighbours(tmp: Path) -> None:
    """Files a careless path may hit: a user's folder beside the run, with a file in it."""
    (tmp / "mine").mkdir(exist_ok=True)
    (tmp / "mine" / "notes.txt").write_text("mine")


@SETTINGS
@given(changes=st.lists(st.tuples(st.sampled_from(KEYS), hostile), max_size=3),
       paths=st.dictionaries(st.sampled_from(sorted(PATH_KEYS)),
                             st.sampled_from(["mine", "mine/notes.txt", "run", "missing/x",
                                              "auto", "off", ""]), max_size=1))
def test_train_with_random_config_values(tmp_path_factory, monkeypatch, changes, paths):
    tmp = tmp_path_factory.mktemp("cli")
    monkeypatch.chdir(tmp)
    _neighbours(tmp)
    cfg = json.loads(json.dumps({**QUICK, "run_dir": str(tmp / "run")}))
    for (key, _), value in changes:
        section, _, name = key.rpartition(".")
        (cfg.setdefault(section, {}) if section else cfg)[name] = value
    for key, value in paths.items():
        section, _, name = key.rpartition(".")
        (cfg.setdefault(section, {}) if section else cfg)[name] = str(tmp / value) if value else ""
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    before = _snapshot(tmp, tmp / "run")
    code, err = _run_cli(["train", str(tmp / "c.yaml")])
    _check_outcome(code, err)
    after = _snapshot(tmp, tmp / "run")
    assert {p: after.get(p) for p in before} == before, "a file outside the run changed"


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        train(_quick_config(), run)
    return run


def _quick_config() -> Config:
    from ldmkit.config import from_dict

    return from_dict({**QUICK, "train": {**QUICK["train"], "steps": 4}})


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**12)
                           | st.floats(allow_nan=False) | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)
META_KEYS = ["step", "config", "latent_scale_factor", "optimizer", "data_order", "ema_updates",
             "nonfinite_steps", "acc_count", "format_version", "rollbacks", "lr_scale",
             "sick_since"]


def _damage(kind: str, data: st.DataObject, run: Path) -> None:
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    if kind == "any_file":  # every file the run holds, whatever it is
        target = data.draw(st.sampled_from(RunDir(run).files()))
        how = data.draw(st.sampled_from(["binary", "truncate", "empty", "fifo"]))
        if how == "fifo":
            target.unlink()
            os.mkfifo(target)
        elif how == "truncate":
            content = target.read_bytes()
            target.write_bytes(content[: data.draw(st.integers(0, max(len(content) - 1, 0)))])
        else:
            target.write_bytes(b"" if how == "empty" else data.draw(st.binary(min_size=1,
                                                                              max_size=300)))
    elif kind == "meta_field":
        meta = json.loads((ckpt / "meta.json").read_text())
        meta[data.draw(st.sampled_from(META_KEYS))] = data.draw(json_values)
        (ckpt / "meta.json").write_text(json.dumps(meta))
    elif kind == "meta_bytes":
        (ckpt / "meta.json").write_bytes(data.draw(st.binary(max_size=200)))
    elif kind == "ckpt_name":
        name = data.draw(st.sampled_from(["step_", "step_-1", "step_99999999999999999999",
                                          "step_abc", "step_0000002.bak", "step_1e3"]))
        ckpt.rename(ckpt.with_name(name))
    elif kind == "truncate":
        target = data.draw(st.sampled_from([ckpt / "weights.safetensors",
                                            ckpt / "training.safetensors",
                                            run / "autoencoder" / "weights.safetensors",
                                            run / "latents" / "mean.npy"]))
        content = target.read_bytes()
        target.write_bytes(content[: data.draw(st.integers(0, len(content) - 1))])
    else:
        target = {"metrics": run / "metrics.jsonl", "findings": run / "findings.jsonl",
                  "grid": run / "samples" / "final" / "grid.png",
                  "recon": run / "autoencoder" / "reconstructions.png",
                  "ae_meta": run / "autoencoder" / "meta.json",
                  "cache_meta": run / "latents" / "meta.json",
                  "config": run / "config.yaml"}[kind]
        if kind in ("metrics", "findings"):
            lines = data.draw(st.lists(json_values.map(json.dumps), max_size=4))
            with target.open("a") as fh:
                fh.write("\n".join(lines) + data.draw(st.text(max_size=10)))
        elif kind in ("ae_meta", "cache_meta"):
            target.write_text(json.dumps(data.draw(json_values)))
        elif kind == "config":
            target.write_text(data.draw(st.text(string.printable, max_size=200)))
        else:
            target.write_bytes(data.draw(st.binary(max_size=300)))


DAMAGE = ["any_file", "any_file", "meta_field", "meta_bytes", "ckpt_name", "truncate", "metrics",
          "findings", "grid", "recon", "ae_meta", "cache_meta", "config"]
COMMANDS = [["sample", "{run}", "--num", "2", "--steps", "1"], ["report", "{run}"],
            ["diagnose", "{run}"], ["watch", "{run}", "--once"], ["encode", "{run}"],
            ["train", "--resume", "{run}", "--set", "train.steps=6"]]


@SETTINGS
@given(kind=st.sampled_from(DAMAGE), command=st.sampled_from(COMMANDS), data=st.data())
def test_commands_on_a_damaged_run(finished, tmp_path_factory, kind, command, data):
    tmp = tmp_path_factory.mktemp("damaged")
    _neighbours(tmp)
    run = tmp / "run"
    subprocess.run(["cp", "-a", str(finished), str(run)], check=True)
    _damage(kind, data, run)
    before = _snapshot(tmp, run)
    code, err = _run_cli([part.format(run=run) for part in command], timeout=120)
    _check_outcome(code, err)
    assert _snapshot(tmp, run) == before


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0] + ("-resume" if "--resume" in c
                                                                     else ""))
def test_no_command_waits_on_a_fifo_in_a_run(finished, tmp_path, command):
    """A FIFO where a run's log is expected: every command refuses it at once, naming it."""
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished), str(run)], check=True)
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    code, err = _run_cli([part.format(run=run) for part in command], timeout=60)
    assert code == 2 and f"'{run / 'metrics.jsonl'}'" in err and "FIFO" in err, err


def test_resume_with_binary_bytes_in_any_run_record_is_one_line(finished, tmp_path):
    """``fastpath.jsonl``, ``changes.jsonl`` and ``classes.json`` holding bytes that are not
    UTF-8: a resume judges their content (used or refused in one line), never a decoding
    traceback."""
    run = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished), str(run)], check=True)
    for path in (RunDir(run).fastpath, RunDir(run).changes, RunDir(run).classes_file):
        path.write_bytes(b"\xff\xfe\x00binary\x80\n")
    code, err = _run_cli(["train", "--resume", str(run), "--set", "train.steps=6"], timeout=300)
    _check_outcome(code, err)
