"""Remedies as data (``vitals.remedy``) and ``ldmkit fix``: a run that starts sick, fixed by
the command, ends with the finding cleared; nothing of the old run is lost."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from conftest import TINY, copy_run, tiny_config
from test_vitals_rules import ctx, healthy_series, replay, with_values

from ldmkit.cli import main
from ldmkit.jobs.fix import plan_fix
from ldmkit.run.checkpoint import step_of
from ldmkit.run.layout import RunDir
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.logs.trainers import TRAINERS
from ldmkit.vitals.remedy import RemedySpec, remedy_of, render


def test_a_fix_names_settings_in_whoever_reads_it():
    text = "lower $train.lr to 1e-05 or lengthen $train.warmup_steps."
    assert render(text) == "lower train.lr to 1e-05 or lengthen train.warmup_steps."
    kohya = next(t for t in TRAINERS if t.name == "kohya")
    assert render(text, kohya.names) == \
        "lower --learning_rate to 1e-05 or lengthen --lr_warmup_steps."  # the full stop stays
    assert render("costs $5", {}) == "costs $5"  # not a setting: left as it is


def test_a_remedy_holds_the_numbers_its_text_quotes():
    series = with_values(healthy_series(), vm.LOSS, lambda s, v: math.nan if s >= 1900 else v)
    (finding,) = [f for f in replay(series, ctx()) if f.code == "loss_nonfinite"]
    remedy = finding.remedy
    assert remedy.automatic and remedy.restart == "healthy"
    ((key, lr),) = remedy.changes
    assert key == "train.lr" and f"train.lr = {lr:.4g}" in finding.fix
    spec = RemedySpec((("train.lr", "lr_retry"),), "latest", automatic=True)
    unknown = remedy_of(spec, "lower $train.lr", {"lr_retry": math.nan})
    assert unknown.changes == () and not unknown.automatic  # no number: a person decides


def test_another_trainers_remedy_is_in_its_settings(tmp_path, capsys):
    from test_trainer_logs import kohya, make_run

    path = kohya(tmp_path, make_run("diverging"))
    assert main(["diagnose", str(path), "--json", "--fail-on", "never"]) == 0
    (finding,) = json.loads(capsys.readouterr().out)["findings"]
    assert finding["remedy"]["changes"] == [
        {"key": "train.lr", "setting": "--learning_rate", "value": 1e-05}]
    assert "--learning_rate = 1e-05" in finding["fix"] and "train.lr" not in finding["fix"]


def test_what_training_does_at_a_finding_under_each_setting():
    """Repair stops only for what it can repair; the rest is announced, as under warn."""
    from ldmkit.vitals.monitor import mode_for

    def raised(tag: str, value: float, code: str):
        series = with_values(healthy_series(), tag, lambda s, v: value)
        return next(f for f in replay(series, ctx()) if f.code == code)

    critical = raised(vm.T_MEAN, 0.95, "t_mean_biased")
    warning = raised(vm.T_MEAN, 0.65, "t_mean_biased")
    inverted = raised(vm.COS_EPS, -0.5, "cos_eps_negative")  # a bug: no automatic remedy
    assert (critical.severity, warning.severity) == ("critical", "warning")
    assert [mode_for(critical, mode, "warn") for mode in ("warn", "stop", "repair")] == \
        ["warn", "stop", "repair"]
    assert mode_for(warning, "repair", "warn") == "warn"
    assert mode_for(warning, "warn", "repair") == "repair"
    assert mode_for(inverted, "repair", "repair") == "warn"
    assert mode_for(inverted, "stop", "repair") == "stop"


def sick_config(tmp: Path, stage1: Path, name: str, **sections: dict) -> Path:
    """TINY started sick (``sections`` replaced), reusing the session run's stage 1."""
    config = tmp / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        **TINY, **{k: {**TINY.get(k, {}), **v} for k, v in sections.items()},
        "autoencoder": {**TINY["autoencoder"], "pretrained": str(stage1)},
        "run_dir": str(tmp / name)}))
    return config


def sick_run(tmp: Path, stage1: Path, name: str, diffusion: dict) -> Path:
    assert main(["train", str(sick_config(tmp, stage1, name, diffusion=diffusion))]) == 0
    return tmp / name


def snapshot(run: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in run.rglob("*")}


@pytest.mark.slow
def test_fix_starts_a_run_with_the_wrong_scale_again_in_a_new_run_beside_it(tiny_run, tmp_path,
                                                                             capsys):
    run = sick_run(tmp_path, tiny_run.run_dir, "scale", {"latent_scale_factor": 8.0})
    assert main(["diagnose", str(run), "--fail-on", "never"]) == 0
    assert "z_std_high" in capsys.readouterr().out
    before = snapshot(run)
    assert main(["fix", str(run), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "change: diffusion.latent_scale_factor = " in plan and f"{run}-fixed" in plan
    assert snapshot(run) == before and not Path(f"{run}-fixed").exists()  # a plan writes nothing
    assert main(["fix", str(run)]) == 0
    fixed = Path(f"{run}-fixed")
    scale = RunDir(fixed).load_config().diffusion.latent_scale_factor
    planned = float(re.search(r"latent_scale_factor = ([0-9.e+-]+);", plan).group(1))
    assert scale == pytest.approx(planned) and 0.2 < scale < 2  # 8 / z_std
    assert plan_fix(fixed).applied == []  # healthy: nothing left to fix
    (record,) = [json.loads(line) for line in RunDir(run).changes.read_text().splitlines()]
    assert record["fix"] == ["z_std_high"] and record["new_run"] == str(fixed)
    assert all(Path(p).exists() for p in before)  # the old run is kept whole


@pytest.mark.slow
def test_fix_continues_a_run_with_biased_timesteps_until_the_finding_clears(tiny_run, tmp_path,
                                                                             capsys):
    run = sick_run(tmp_path, tiny_run.run_dir, "tbias",
                   {"t_sampling": "logit_normal", "logit_normal_loc": 3.0})
    assert main(["fix", str(run)]) == 0
    out = capsys.readouterr().out
    assert "change: diffusion.t_sampling = uniform; continue from the latest checkpoint" in out
    saved = RunDir(run).load_config()
    assert saved.diffusion.t_sampling == "uniform" and saved.train.steps == 12 + 5 * 4
    assert step_of(RunDir(run).latest_checkpoint()) == 32
    plan = plan_fix(run)  # the critical is history now, not a finding to fix again
    assert plan.applied == []
    assert main(["diagnose", str(run), "--json", "--fail-on", "never"]) == 0
    (cleared,) = json.loads(capsys.readouterr().out)["findings"]
    assert cleared["code"] == "t_mean_biased" and cleared["cleared_at"] <= 32


def set_values(run: Path, tag: str, value) -> None:
    """Rewrite the logged values of ``tag`` in a copied run (``value(step)``; NaN as ldmkit
    logs it, a string)."""
    records = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]
    for record in records:
        if record["tag"] == tag:
            new = value(record["step"])
            record["value"] = new if math.isfinite(new) else str(new).replace("nan", "NaN")
    RunDir(run).metrics.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow
def test_fix_goes_back_to_the_checkpoint_before_a_divergence(tiny_run, tmp_path, capsys):
    """A NaN loss at step 12: the weights of checkpoint 8 made step 9, so the run resumes from
    8 with a tenth of the learning rate; checkpoint 12 moves to checkpoints/diverged."""
    run = copy_run(tiny_run.run_dir, tmp_path / "run")
    set_values(run, vm.LOSS, lambda step: math.nan if step == 12 else 0.9)
    plan = plan_fix(run)
    assert [f.code for f in plan.applied] == ["loss_nonfinite"] and plan.restart == "healthy"
    assert step_of(plan.checkpoint) == 8 and plan.steps == 8 + 5 * 4
    lr = tiny_config().train.lr
    assert plan.changes == {"train.lr": pytest.approx(lr / 10)}
    assert main(["fix", str(run)]) == 0
    assert (RunDir(run).checkpoints / "diverged" / "step_0000012").exists()
    assert RunDir(run).load_config().train.lr == pytest.approx(lr / 10)
    losses = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()
              if '"tag": "loss/total_loss"' in line]
    assert all(isinstance(r["value"], float) for r in losses) and losses[-1]["step"] == 28


def test_fix_refuses_what_is_not_an_ldmkit_run(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["fix", str(tmp_path)]) == 2
    assert "is not an ldmkit run directory" in capsys.readouterr().err


def test_a_finding_without_an_automatic_remedy_names_the_checkpoint_to_keep(tiny_run, tmp_path,
                                                                            capsys):
    """An inverted noise estimate is a bug in the loop, not a setting: nothing is applied, and
    the plan names the checkpoint saved before it was raised."""
    run = copy_run(tiny_run.run_dir, tmp_path / "run")
    set_values(run, vm.COS_EPS, lambda step: -0.5)
    plan = plan_fix(run)
    assert plan.applied == [] and plan.restart == "none"
    ((finding, keep),) = plan.manual
    assert finding.code == "cos_eps_negative" and not finding.remedy.automatic
    assert keep == f"keep {RunDir(run).checkpoint_at_most(8)} (the newest saved before " \
                   "cos_eps_negative was raised at step 12)"
    before = snapshot(run)
    assert main(["fix", str(run)]) == 0
    assert "no automatic remedy for cos_eps_negative" in capsys.readouterr().out
    assert snapshot(run) == before  # nothing applied, nothing written


def repairing_config(tmp: Path, stage1: Path, **vitals) -> Path:
    return sick_config(tmp, stage1, "run", train={"steps": 24},
                       diffusion={"t_sampling": "logit_normal", "logit_normal_loc": 3.0},
                       vitals={"on_critical": "repair", **vitals})


@pytest.mark.slow
def test_a_run_set_to_repair_itself_stops_applies_the_remedy_and_ends_healthy(tiny_run, tmp_path,
                                                                              capsys):
    assert main(["run", str(repairing_config(tmp_path, tiny_run.run_dir))]) == 0
    out = capsys.readouterr().out
    assert "stopping at step 12 to repair t_mean_biased (vitals.on_critical=repair)" in out
    assert "[vitals] repairing: fix of" in out
    run = RunDir(tmp_path / "run")
    fix, resumed = [json.loads(line) for line in run.changes.read_text().splitlines()]
    assert fix == {"fix": ["t_mean_biased"], "by": "vitals repair",
                   "changes": {"diffusion.t_sampling": "uniform"}, "restart": "latest",
                   "at_step": 12}
    assert resumed["changed"]["diffusion.t_sampling"] == ["logit_normal", "uniform"]
    assert run.load_config().diffusion.t_sampling == "uniform"
    assert step_of(run.latest_checkpoint()) == 32 and plan_fix(run.path).applied == []
    assert "No open findings" in run.report_md.read_text()


@pytest.mark.slow
def test_repairs_are_bounded_by_max_repairs(tiny_run, tmp_path, capsys):
    assert main(["run", str(repairing_config(tmp_path, tiny_run.run_dir, max_repairs=0))]) == 1
    assert "not repairing t_mean_biased: vitals.max_repairs (0) repairs made" in \
        capsys.readouterr().out
    run = RunDir(tmp_path / "run")
    assert not run.changes.exists() and step_of(run.latest_checkpoint()) == 12
