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
    assert "not a directory" in capsys.readouterr().err
