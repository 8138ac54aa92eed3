"""Nothing lost, nothing let in: what a careless user can point ldmkit at must never delete,
overwrite or leak data, and every refusal comes before anything is written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY, copy_run, tiny_config
from safetensors.torch import load_file

from ldmkit.cli import main
from ldmkit.platform.files import open_append, write_bytes_atomic
from ldmkit.run.layout import RunLock
from ldmkit.sampling.generate import generate
from ldmkit.training.loop import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def write_config(path: Path, **sections) -> Path:
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ldmkit: error:"), err
    return err


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    train(tiny_config(train={"steps": 4, "sample_every": 100}), run)
    return run


# 1. the latent-cache writer never removes a directory ldmkit did not create
def test_a_latent_cache_pointed_at_the_images_is_refused_and_nothing_is_deleted(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(6):
        Image.new("L", (16, 16), i * 40).save(images / f"{i}.png")
    before = snapshot(images)
    config = write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run"),
                          data={"source": "folder", "path": str(images), "limit": None,
                                "latent_cache": str(images)})
    assert main(["train", str(config)]) == 2
    assert "not an ldmkit latent cache" in one_line_error(capsys)
    assert snapshot(images) == before and not (tmp_path / "run").exists()


def test_encode_out_into_a_run_or_a_config_naming_a_user_directory_is_refused(finished, tmp_path,
                                                                               capsys):
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    assert main(["encode", str(run), "--out", str(run)]) == 2
    assert "never replaces it" in one_line_error(capsys)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["data"]["latent_cache"] = str(precious)  # a downloaded run's config
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    before[run / "config.yaml"] = (run / "config.yaml").read_bytes()
    assert main(["encode", str(run)]) == 2
    one_line_error(capsys)
    assert main(["train", "--resume", str(run), "--set", "train.steps=6"]) == 2
    one_line_error(capsys)
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert snapshot(run) == before


def test_a_cache_made_before_owner_files_is_still_reused(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    (run / "latents" / ".ldmkit").unlink()
    assert main(["encode", str(run)]) == 0
    assert "reusing" in capsys.readouterr().out


# 2. a run directory is new, empty or a run
def test_a_non_empty_directory_that_is_not_a_run_is_refused_untouched(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "latents").mkdir(parents=True)
    (mine / "latents" / "notes.txt").write_text("mine")
    (mine / "metrics.jsonl").write_text('{"step": 1, "tag": "my/metric", "value": 3}\n')
    (mine / "samples" / "final").mkdir(parents=True)
    (mine / "samples" / "final" / "grid.png").write_bytes(b"my picture")
    before = snapshot(mine)
    config = write_config(tmp_path / "c.yaml", run_dir=str(mine))
    assert main(["train", str(config)]) == 2
    assert "not an ldmkit run" in one_line_error(capsys)
    assert snapshot(mine) == before


# 3. one writer per run
def test_a_second_writer_is_refused_naming_the_holder_and_readers_still_work(finished, tmp_path,
                                                                            capsys):
    run = copy_run(finished, tmp_path / "run")
    lock = RunLock(run).acquire()
    try:
        for argv in (["train", "--resume", str(run), "--set", "train.steps=6"],
                     ["sample", str(run), "--num", "2", "--steps", "1"], ["encode", str(run)]):
            assert main(argv) == 2
            assert f"in use by another ldmkit process (PID {os.getpid()})" in one_line_error(capsys)
        assert main(["diagnose", str(run), "--fail-on", "never"]) == 0
        assert main(["report", str(run)]) == 0
        assert main(["watch", str(run), "--once"]) == 0
    finally:
        lock.release()
    assert main(["sample", str(run), "--num", "2", "--steps", "1"]) == 0


def test_the_lock_is_released_when_its_holder_is_killed(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from ldmkit.run.layout import RunLock; RunLock(Path(sys.argv[1]))"
                               ".acquire(); print('held', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match=f"PID {holder.pid}"):
        RunLock(run).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    RunLock(run).acquire().release()


# 4. links inside a run are never followed
def test_a_symlinked_grid_never_ends_up_in_the_report(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    secret = tmp_path / "id_rsa"
    secret.write_bytes(b"PRIVATE KEY 1234")
    grid = run / "samples" / "final" / "grid.png"
    grid.unlink()
    grid.symlink_to(secret)
    (run / "report.html").unlink(missing_ok=True)
    assert main(["report", str(run)]) == 2
    assert "symbolic link" in one_line_error(capsys)
    assert not (run / "report.html").exists()


@pytest.mark.parametrize("link", ["metrics.jsonl", "samples"])
def test_sample_never_writes_through_a_link_out_of_the_run(finished, tmp_path, capsys, link):
    run = copy_run(finished, tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / link
    os.replace(run / link, target)
    (run / link).symlink_to(target)
    before = snapshot(outside)
    assert main(["sample", str(run), "--num", "2", "--steps", "1"]) == 2
    assert "symbolic link" in one_line_error(capsys)
    assert snapshot(outside) == before


def test_low_level_writers_replace_or_refuse_links(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (tmp_path / "a.png").symlink_to(outside)
    write_bytes_atomic(tmp_path / "a.png", b"new")
    assert outside.read_text() == "keep" and not (tmp_path / "a.png").is_symlink()
    (tmp_path / "log.jsonl").symlink_to(outside)
    with pytest.raises(Exception, match="symbolic link"):
        open_append(tmp_path / "log.jsonl")
    assert outside.read_text() == "keep"


# 5. YAML alias bombs are bounded, in a config, a --set value and a run's own config.yaml
LEVELS = ["&l0 [" + ", ".join(["x"] * 9) + "]"] + [
    f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 8)]
BOMB = f"train:\n  lr: [{', '.join(LEVELS)}]\n"  # 9**8 values under a known key


def test_yaml_alias_bombs_are_refused_without_expanding(finished, tmp_path, capsys):
    (tmp_path / "bomb.yaml").write_text(BOMB)
    assert main(["train", str(tmp_path / "bomb.yaml")]) == 2
    err = one_line_error(capsys)
    assert "aliases" in err and len(err) < 400
    levels = ["&l0 [" + ", ".join(["1"] * 10) + "]"] + [
        f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 8)]
    assert main(["train", str(write_config(tmp_path / "c.yaml")), "--set",
                 f"train.betas=[{', '.join(levels)}]"]) == 2
    assert "aliases" in one_line_error(capsys)
    run = copy_run(finished, tmp_path / "run")
    (run / "config.yaml").write_text(BOMB)
    assert main(["diagnose", str(run), "--fail-on", "never"]) == 0
    assert main(["report", str(run)]) == 0
    assert main(["watch", str(run), "--once"]) == 0


# 6. a divergence before the first log interval goes back to healthy weights, with advice that works
def test_divergence_before_the_first_log_stops_on_healthy_weights_with_working_advice(tmp_path,
                                                                                   capsys):
    config = write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run"),
                          train={"lr": 1e6, "warmup_steps": 0, "log_every": 50, "steps": 40,
                                 "checkpoint_every": 1, "sample_every": 1000},
                          vitals={"on_nonfinite": "stop"})
    assert main(["train", str(config)]) == 1
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert (run / "report.html").is_file() and (run / "report.md").is_file()
    assert "nonfinite_stop" in out and "scenario: diverged" in out
    fix = re.search(r"--set train\.lr=([0-9.e-]+)", out).group(1)
    assert float(fix) <= 1e-3
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert ckpts, "the run's start is kept to go back to"
    weights = load_file(str(ckpts[-1] / "weights.safetensors"))
    largest = max(float(v.abs().max()) for k, v in weights.items() if k.startswith("model."))
    assert largest < 100, f"the checkpoint kept for resume has blown-up weights ({largest})"
    assert list((run / "checkpoints" / "diverged").glob("step_*")), "later ones are kept aside"
    assert main(["train", "--resume", str(run), "--set", f"train.lr={fix}"]) == 0
    out = capsys.readouterr().out
    assert "changed train.lr 1000000.0 -> 0.001" in out
    changes = [json.loads(line) for line in (run / "changes.jsonl").read_text().splitlines()]
    assert changes[-1]["changed"]["train.lr"] == [1e6, float(fix)]
    assert main(["diagnose", str(run), "--fail-on", "critical"]) == 0


# 7. bad input leaves everything as it was, and the corrected command then runs
def test_a_data_error_writes_nothing_and_the_fixed_config_runs(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run"),
                          data={"source": "folder", "path": str(empty), "limit": None})
    assert main(["train", str(config)]) == 2
    assert "no readable image" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()
    write_config(config, run_dir=str(tmp_path / "run"), train={"steps": 2})
    assert main(["train", str(config)]) == 0


def test_a_mismatched_resume_is_refused_before_the_cache_is_rebuilt(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["base_channels"] = 24  # the run's own config edited by hand
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    subprocess.run(["rm", "-r", str(run / "latents")], check=True)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--set", "train.steps=6"]) == 2
    assert "does not match this config's model" in one_line_error(capsys)
    assert snapshot(run) == before and not (run / "latents").exists()


# 8. --resume --set: what breaks the run is refused, the rest is said and recorded
def test_resume_overrides_are_refused_or_recorded(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    for key, value in (("data.limit", 100), ("model.num_heads", 2), ("autoencoder.kl_weight", 0.1),
                       ("seed", 3), ("diffusion.objective", "v")):
        assert main(["train", "--resume", str(run), "--set", f"{key}={value}"]) == 2
        assert f"cannot change {key} when resuming" in one_line_error(capsys)
    assert snapshot(run) == before
    assert main(["train", "--resume", str(run), "--set", "train.batch_size=8",
                 "--set", "train.steps=6"]) == 0
    assert "changed train.batch_size 16 -> 8, train.steps 4 -> 6" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in (run / "changes.jsonl").read_text().splitlines()]
    assert record == {"at_step": 4, "changed": {"train.batch_size": [16, 8],
                                                "train.steps": [4, 6]}}


# 9. a stop request ends sampling at its next step
def test_generate_stops_at_the_next_sampler_step_when_asked(finished):
    from ldmkit.config import from_dict
    from ldmkit.platform.preemption import Preempted
    from ldmkit.sampling.trained import load_for_sampling

    cfg_dict, _, model, ae, scale, _ = load_for_sampling(finished)
    asked = []

    def interrupt() -> bool:
        asked.append(1)
        return len(asked) >= 3

    with pytest.raises(Preempted):
        generate(model, ae, scale, from_dict(cfg_dict), 4, "ddim", 200, 0, interrupt=interrupt)
    assert len(asked) == 3


def test_sigint_during_the_final_sampling_says_so_and_writes_the_report(tmp_path):
    config = write_config(tmp_path / "c.yaml", run_dir=str(tmp_path / "run"),
                          train={"steps": 4, "sample_every": 100},
                          sample={"num": 64, "steps": 10000})  # the most a sampling may take
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit", "train", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = tmp_path / "run" / "checkpoints" / "step_0000004"
    for _ in range(1200):
        if last.is_dir() or proc.poll() is not None:
            break
        time.sleep(0.1)
    time.sleep(1.0)  # in the final sampling now
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGINT during the final sampling" in out
    assert (tmp_path / "run" / "report.html").is_file()
    assert not (tmp_path / "run" / "samples" / "final" / "grid.png").exists()


def test_written_files_and_directories_keep_the_usual_modes(finished):
    mask = os.umask(0)
    os.umask(mask)
    for path in (finished / "config.yaml", finished / ".ldmkit", finished / "samples" / "final"
                 / "grid.png", finished / "latents" / "meta.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
    for path in (finished / "latents", finished / "autoencoder", finished / "checkpoints"
                 / "step_0000004"):
        assert path.stat().st_mode & 0o777 == 0o777 & ~mask, path


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch, capsys):
    """A write to an open file on a full disk says only "No space left on device": the error
    names the log it was writing, as every other file error does."""
    import errno

    log = open_append(tmp_path / "metrics.jsonl")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log.fh, "write", full)
    with pytest.raises(OSError) as caught:
        log.write("{}\n")
    assert caught.value.filename == str(tmp_path / "metrics.jsonl")
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as caught:
        write_bytes_atomic(tmp_path / "grid.png", b"png")
    assert caught.value.filename == str(tmp_path / "grid.png")
    assert not list(tmp_path.glob(".grid.png.*"))  # the temporary file is gone


@pytest.mark.parametrize("command, blamed", [
    (["diagnose", "{log}"], "the log is larger than this machine's memory"),
    (["watch", "{run}", "--once"], "the run's log is larger than this machine's memory")])
def test_out_of_memory_names_what_the_command_was_doing(tmp_path, monkeypatch, capsys, command,
                                                        blamed):
    from ldmkit.vitals.logs import readers
    from ldmkit.vitals.logs.formats import JsonLines

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(readers, "read_raw", exhausted)
    monkeypatch.setattr(JsonLines, "poll", exhausted)
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "m.jsonl").write_text("")
    argv = [part.format(log=tmp_path / "m.jsonl", run=tmp_path) for part in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert blamed in err and "train.batch_size" not in err
