"""``ldmkit diagnose`` on every input format, with other trainers' tag names, and its exit codes."""

import json

import pytest
from test_vitals_rules import SCALE, healthy_series, with_values
from torch.utils.tensorboard import SummaryWriter

from ldmkit.cli import main
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.logs.readers import read_log
from ldmkit.vitals.logs.sources import FORMATS

SCALE_BUG = with_values(healthy_series(), vm.Z_STD, lambda s, v: 0.15)


def write_jsonl(path, series, scale=SCALE):
    with path.open("w") as fh:
        if scale is not None:
            fh.write(json.dumps({"step": 0, "tag": vm.SCALE_FACTOR, "value": scale}) + "\n")
        for tag, recs in series.items():
            for step, value in recs:
                fh.write(json.dumps({"step": step, "tag": tag, "value": value}) + "\n")
    return path


def run_json(argv, capsys):
    code = main(["diagnose", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_json_output_has_exactly_the_documented_shape(tmp_path, capsys):
    code, out = run_json([str(write_jsonl(tmp_path / "metrics.jsonl", SCALE_BUG))], capsys)
    assert code == 1  # a critical finding, default --fail-on critical
    assert set(out) == {"scenario", "verdict", "findings", "trainer", "regime", "regime_reason",
                        "missing_vitals", "hook", "notes"} and out["scenario"] == "scale_factor_bug"
    assert out["verdict"] == "scale_factor_bug" and out["regime"] == "pretrain"
    assert out["trainer"] == "ldmkit" and out["hook"] == "" and out["notes"] == []
    finding = out["findings"][0]
    assert set(finding) == {"code", "severity", "metric", "step", "value", "message", "fix",
                            "remedy", "cleared_at", "tags_read"}
    assert finding["cleared_at"] is None
    assert finding["tags_read"] == [vm.Z_STD]
    assert finding["code"] == "z_std_low" and finding["severity"] == "critical"
    assert f"{SCALE / 0.15:.4g}" in finding["fix"]
    assert finding["remedy"] == {"changes": [{
        "key": "diffusion.latent_scale_factor", "setting": "diffusion.latent_scale_factor",
        "value": float(f"{SCALE / 0.15:.4g}")}], "restart": "start", "automatic": True}


def test_fail_on_levels(tmp_path, capsys):
    path = str(write_jsonl(tmp_path / "m.jsonl", with_values(healthy_series(), vm.Z_STD,
                                                             lambda s, v: 0.4)))
    assert main(["diagnose", path]) == 0  # only a warning
    assert main(["diagnose", path, "--fail-on", "warning"]) == 1
    assert main(["diagnose", path, "--fail-on", "never"]) == 0
    healthy = str(write_jsonl(tmp_path / "h.jsonl", healthy_series()))
    assert main(["diagnose", healthy, "--fail-on", "warning"]) == 0
    out = capsys.readouterr().out
    assert "scenario: healthy" in out and "z_std_low" in out


def test_csv_input_and_scale_from_the_flag(tmp_path, capsys):
    path = tmp_path / "log.csv"
    rows = ["step,tag,value"] + [f"{s},{tag},{v}" for tag, recs in SCALE_BUG.items()
                                 for s, v in recs]
    path.write_text("\n".join(rows) + "\n")
    code, out = run_json([str(path), "--latent-scale-factor", "2.0"], capsys)
    assert out["findings"][0]["code"] == "z_std_low"
    assert f"{2.0 / 0.15:.4g}" in out["findings"][0]["fix"]


@pytest.mark.parametrize("aliases", [
    {vm.LOSS: "loss", vm.GRAD_NORM: "grad_norm", vm.LEARNING_RATE: "learning_rate"},  # guide
    {vm.LOSS: "train_loss", vm.LEARNING_RATE: "lr"},  # diffusers examples
    {vm.LOSS: "train/loss_simple", vm.LEARNING_RATE: "lr_abs"},  # CompVis latent-diffusion
    {},  # our own tags
])
def test_tensorboard_logs_with_aliases(tmp_path, capsys, aliases):
    series = with_values(healthy_series(), vm.LOSS, lambda s, v: float("nan") if s >= 1500 else v)
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        for tag, recs in series.items():
            for step, value in recs:
                writer.add_scalar(aliases.get(tag, tag), value, step)
    log = read_log(tmp_path / "tb")
    assert vm.LOSS in log.series and vm.LEARNING_RATE in log.series
    code, out = run_json([str(tmp_path / "tb"), "--latent-scale-factor", str(SCALE)], capsys)
    assert code == 1 and out["scenario"] == "diverged"
    assert out["findings"][0]["code"] == "loss_nonfinite" and out["findings"][0]["step"] == 1500
    event_file = next((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert run_json([str(event_file)], capsys)[1]["scenario"] == "diverged"


def test_canonical_tag_wins_over_an_alias(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("step,tag,value\n1,loss,5.0\n1,loss/total_loss,0.5\n")
    assert read_log(path).series[vm.LOSS] == [(1, 0.5)]


def test_torn_last_line_is_tolerated_but_a_bad_middle_line_is_not(tmp_path, capsys):
    path = write_jsonl(tmp_path / "metrics.jsonl", healthy_series())
    with path.open("a") as fh:
        fh.write('{"step": 2050, "tag": "loss/tot')
    assert main(["diagnose", str(path)]) == 0
    lines = path.read_text().splitlines()
    lines.insert(3, "garbage")
    path.write_text("\n".join(lines))
    assert main(["diagnose", str(path)]) == 2
    assert "line 4" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, needle", [
    ("events.out.tfevents.123.host", b"\x00\x01not a tensorboard record" * 10, "TensorBoard"),
    ("log.csv", b"a,b\n1,2\n", "needs step,tag,value"),
    ("metrics.jsonl", b"", "no loss or sample-diversity values"),
    ("log.txt", b"hello", "unknown format"),
])
def test_unreadable_inputs_exit_2_with_one_line(tmp_path, capsys, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["diagnose", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_missing_path_and_empty_directory_list_every_format_read(tmp_path, capsys):
    """The errors and the help list the formats from the one table the readers use."""
    assert main(["diagnose", str(tmp_path / "nope")]) == 2
    assert "does not exist; pass an ldmkit run directory" in capsys.readouterr().err
    assert main(["diagnose", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds no log ldmkit reads (searched 3 levels down)" in err
    assert len(err.splitlines()) == 1
    (tmp_path / "log.txt").write_text("step loss\n")
    assert main(["diagnose", str(tmp_path / "log.txt")]) == 2
    err = capsys.readouterr().err
    assert "unknown format" in err
    for fmt in FORMATS:
        assert fmt.what in err
    with pytest.raises(SystemExit):
        main(["diagnose", "--help"])
    assert "ai-toolkit's loss_log.db" in " ".join(capsys.readouterr().out.split())


def test_a_healthy_verdict_says_whether_sample_quality_was_measured(tmp_path, capsys):
    series = healthy_series()
    code, out = run_json([str(write_jsonl(tmp_path / "a.jsonl", series))], capsys)
    assert out["scenario"] == "healthy"
    assert out["verdict"] == "healthy dynamics; sample quality not measured (`ldmkit eval RUN`)"
    last = max(s for recs in series.values() for s, _ in recs)
    series = {**series, "eval/fd": [(last, 21.5)], "eval/precision": [(last, 0.8)]}
    code, out = run_json([str(write_jsonl(tmp_path / "b.jsonl", series))], capsys)
    assert out["verdict"] == (f"healthy dynamics; sample quality measured at step {last} "
                              "(fd 21.5, precision 0.8)")


def test_objective_says_what_a_log_without_a_config_regresses(tmp_path, capsys):
    """A healthy flow-matching log (velocity loss 2 -> ~1) is 'stuck' read as eps."""
    flow = with_values(healthy_series(), vm.LOSS, lambda s, v: 2 * v + 0.4)
    path = str(write_jsonl(tmp_path / "metrics.jsonl", flow))
    _, as_eps = run_json([path, "--fail-on", "never"], capsys)
    assert "loss_stuck_high" in {f["code"] for f in as_eps["findings"]}
    _, as_flow = run_json([path, "--objective", "flow"], capsys)
    assert "loss_stuck_high" not in {f["code"] for f in as_flow["findings"]}
