"""ldmkit watch: follows a growing metrics.jsonl and shows the vitals and open findings."""

from __future__ import annotations

import json

from rich.console import Console

from ldmkit.cli import main
from ldmkit.report.watch import MetricsFollower, sparkline, watch
from ldmkit.vitals import metrics as vm


def line(step: int, tag: str, value: float) -> str:
    return json.dumps({"step": step, "tag": tag, "value": value}) + "\n"


def test_follower_reads_only_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(path)
    assert follower.poll() == 0  # not there yet
    full = line(10, vm.LOSS, 0.9)
    path.write_text(line(5, vm.LOSS, 1.0) + full[:12])
    assert follower.poll() == 1
    with path.open("a") as fh:
        fh.write(full[12:] + line(15, vm.LOSS, 0.8))
    assert follower.poll() == 2
    assert follower.series[vm.LOSS] == [(5, 1.0), (10, 0.9), (15, 0.8)]


def test_once_shows_the_vitals_and_the_open_finding(tmp_path):
    with (tmp_path / "metrics.jsonl").open("w") as fh:
        fh.write(line(0, vm.SCALE_FACTOR, 0.18215))
        for step in range(10, 110, 10):
            fh.write(line(step, vm.LOSS, 0.85) + line(step, vm.Z_STD, 0.15))
    console = Console(record=True, width=200)
    watch(tmp_path, once=True, console=console)
    text = console.export_text()
    assert vm.LOSS in text and vm.Z_STD in text and "0.15" in text
    assert "z_std_low" in text and "scale_factor_bug" in text and "latent_scale_factor" in text


def test_sparkline_and_missing_directory(tmp_path, capsys):
    assert sparkline([0.0, 1.0, float("nan"), 0.5]) == "▁█▄"
    assert main(["watch", str(tmp_path / "nope"), "--once"]) == 2
    assert "does not exist; pass a run directory or another trainer's log" in \
        capsys.readouterr().err


def test_other_trainers_logs_are_followed_as_they_are_written(tmp_path):
    """ai-toolkit's loss_log.db and SimpleTuner's training_metrics.jsonl, written to while
    watched: each refresh after a write shows the new steps, with that trainer's tags mapped,
    and the rules judge them as diagnose would (a stuck loss)."""
    import os
    import sqlite3

    from test_trainer_logs import ai_toolkit, make_run, simpletuner_local

    from ldmkit.report.watch import LogFollower

    job = ai_toolkit(tmp_path / "aitk", make_run("stuck"))
    follower = LogFollower(job)
    assert follower.poll() == 1 and follower.poll() == 0  # unchanged: not read again
    assert follower.series[vm.LOSS][-1][0] == 599
    con = sqlite3.connect(job / "loss_log.db", isolation_level=None)
    con.execute("INSERT INTO steps VALUES (600, 0)")
    con.execute("INSERT INTO metrics VALUES (600, 'loss/loss', 1.01, NULL)")
    con.close()
    for file in job.iterdir():
        os.utime(file, (2e9, 2e9))
    assert follower.poll() == 1 and follower.series[vm.LOSS][-1] == (600, 1.01)
    console = Console(record=True, width=200)
    watch(job, once=True, console=console)
    text = console.export_text()
    assert "loss_stuck_high" in text and "train.lr" not in text  # in ai-toolkit's words

    out = simpletuner_local(tmp_path / "st", make_run("healthy"))
    jsonl = out / "training_metrics.jsonl"
    follower = LogFollower(jsonl)
    follower.poll()
    with jsonl.open("a") as fh:
        fh.write(json.dumps({"metrics": {"train_loss": 0.3}, "schema_version": 1,
                             "step": 601, "timestamp": "t"}, separators=(",", ":"),
                            sort_keys=True) + "\n")
    os.utime(jsonl, (2e9, 2e9))
    assert follower.poll() == 1 and follower.series[vm.LOSS][-1] == (601, 0.3)
