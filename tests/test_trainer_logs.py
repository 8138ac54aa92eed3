"""``ldmkit diagnose`` on the logs of the trainers people use, written the way each writes them.

Where the logging code runs here it writes the logs itself: accelerate's TensorBoard tracker
(which diffusers' examples, kohya's sd-scripts and SimpleTuner log through), torch's
SummaryWriter (OneTrainer's), MLflow's own client and the W&B SDK in offline mode (its
``run-<id>.wandb``). Older W&B SDKs' ``wandb-history.jsonl`` (one JSON object per step with
``_step``, ``_runtime``, ``_timestamp``) and ``config.yaml`` (``{key: {desc, value}}``), and the
W&B panel's CSV export (``Step``, ``<run> - <metric>``, ``__MIN``/``__MAX``), are written in
their documented formats. Tag names, step axes and
intervals follow each trainer's source, cited in ``ldmkit.vitals.logs.trainers.TRAINERS``:

- kohya train_network.py: ``loss/current``, ``loss/average`` (a moving average) and
  ``lr/unet``, ``lr/textencoder`` every step; ``loss/epoch_average`` with the epoch as the step.
- diffusers train_text_to_image_lora.py: ``train_loss`` every step, ``vars(args)`` as config;
  train_unconditional.py: ``loss``, ``lr``, ``step``.
- SimpleTuner trainer.py: ``train_loss``, ``optimization_loss``, ``learning_rate``, ``epoch``,
  ``grad_norm`` every step.
- OneTrainer GenericTrainer.py: ``loss/train_step``, ``smooth_loss/train_step``, ``lr/unet``.
- k-diffusion train.py: W&B ``loss``, ``lr``, ``epoch``, ``ema_decay`` every step; its
  ``<name>_metrics.csv`` (step,time,loss,fid,kid) at each evaluation with the EMA loss.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from ldmkit.cli import main
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.held_out_checks import noise_levels
from ldmkit.vitals.logs.readers import read_log
from ldmkit.vitals.offline import diagnose_log

STEPS = 600
LR = 1e-4


VALIDATE_EVERY = 100


@dataclass
class Run:
    kind: str
    loss: list[float]
    lr: list[float]
    grad: list[float]
    val: dict[int, float]  # step -> validation loss, every VALIDATE_EVERY steps


def make_run(kind: str, seed: int = 0) -> Run:
    """Per-step values: a healthy run from scratch, one that diverges (NaN at step 400, the
    gradient norm exploding from 300), one stuck at an untrained loss, a fine-tune whose
    loss is low and flat from the first step (median 0.008: below the guide's 0.01), and one
    that over-fits (the training loss falls throughout, the validation loss from step 300
    rises by about 10 % a validation). Trainers that validate log ``val``."""
    rng = random.Random(seed)
    loss, grad = [], []
    for step in range(1, STEPS + 1):
        noise = rng.gauss(0, 1)
        if kind == "stuck":
            loss.append(1.0 + 0.02 * noise)
        elif kind == "finetune":
            loss.append(0.008 * math.exp(0.4 * noise))
        elif kind == "overfitting":
            loss.append(0.1 + 0.9 * math.exp(-step / 150) + 0.02 * noise)
        else:
            loss.append(max(0.02, 0.25 + 0.75 * math.exp(-step / 80) + 0.05 * noise))
        grad.append(abs(1.5 + 0.4 * rng.gauss(0, 1)))
        if kind == "diverging" and step >= 300:
            grad[-1] = 300.0 * (step - 299)
            if step >= 400:
                loss[-1] = float("nan")
    lr = [LR * min(1.0, s / 50) for s in range(1, STEPS + 1)]
    steps = range(VALIDATE_EVERY, STEPS + 1, VALIDATE_EVERY)
    val = {s: {"stuck": 1.0 + 0.01 * (s % 300 == 0), "finetune": 0.1,
               "overfitting": (0.6, 0.4, 0.44, 0.49, 0.55, 0.62)[s // VALIDATE_EVERY - 1],
               "diverging": 0.3 + 0.7 * math.exp(-s / 150) if s < 400 else float("nan")}
           .get(kind, 0.3 + 0.7 * math.exp(-s / 150)) for s in steps}
    return Run(kind, loss, lr, grad, val)


def accelerate_log(tmp: Path, project: str, config: dict, rows) -> Path:
    """Log ``rows`` (step, dict) with accelerate's own TensorBoard tracker."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    logging_dir = tmp / "logs"
    accelerator = Accelerator(log_with="tensorboard", project_config=ProjectConfiguration(
        project_dir=str(tmp), logging_dir=str(logging_dir)))
    accelerator.init_trackers(project, config=config)
    for step, values in rows:
        accelerator.log(values, step=step)
    accelerator.end_training()
    return logging_dir


class LossRecorder:
    """sd-scripts' library/train_util.py LossRecorder, as its behaviour is documented there:
    in epoch 0 every loss is appended, later ones replace the entry of their index, and the
    logged value is the mean of all entries. Its validation recorder so averages the current
    validation with entries left from the first epoch's."""

    def __init__(self):
        self.losses: list[float] = []

    def add(self, epoch: int, index: int, loss: float) -> None:
        if epoch == 0:
            self.losses.append(loss)
        else:
            self.losses[index] = loss

    @property
    def moving_average(self) -> float:
        return sum(self.losses) / len(self.losses)


def kohya(tmp: Path, run: Run) -> Path:
    rows, average, validation = [], [], LossRecorder()
    for i, (loss, lr) in enumerate(zip(run.loss, run.lr, strict=True)):
        average.append(loss)
        rows.append((i + 1, {"loss/current": loss, "loss/average": sum(average) / len(average),
                             "lr/textencoder": lr / 2, "lr/unet": lr}))
        if i + 1 in run.val:  # --validate_every_n_steps 100, 4 fixed timesteps, one batch
            for index in range(4):
                validation.add(i // 200, index, run.val[i + 1])
            rows.append((i + 1, {"loss/validation/step_average": validation.moving_average,
                                 "loss/validation/step_divergence":
                                     validation.moving_average - sum(average) / len(average)}))
        if (i + 1) % 200 == 0:  # an epoch of 200 steps; the epoch is the step
            rows.append(((i + 1) // 200, {"loss/epoch_average": sum(average) / len(average)}))
            average = []
    config = {"pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
              "network_module": "networks.lora", "learning_rate": LR}
    return accelerate_log(tmp, "network_train", config, rows)


def diffusers_lora(tmp: Path, run: Run) -> Path:
    config = {"pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5", "rank": 4,
              "learning_rate": LR, "snr_gamma": None, "prediction_type": None}
    if run.kind != "finetune":  # a model trained from scratch: its config names no base model
        config["pretrained_model_name_or_path"] = None
    return accelerate_log(tmp, "text2image-fine-tune", config,
                          [(i + 1, {"train_loss": v}) for i, v in enumerate(run.loss)])


def diffusers_unconditional(tmp: Path, run: Run) -> Path:
    rows = [(i + 1, {"loss": v, "lr": lr, "step": i + 1})
            for i, (v, lr) in enumerate(zip(run.loss, run.lr, strict=True))]
    return accelerate_log(tmp, "train_unconditional", {"ddpm_num_steps": 1000}, rows)


def simpletuner(tmp: Path, run: Run) -> Path:
    rows = [(i + 1, {"train_loss": v, "optimization_loss": v, "learning_rate": lr,
                     "epoch": 1 + i // 200, "grad_norm": g}
             | ({"loss/val/eval-cats": run.val[i + 1]} if i + 1 in run.val else {}))
            for i, (v, lr, g) in enumerate(zip(run.loss, run.lr, run.grad, strict=True))]
    return accelerate_log(tmp, "simpletuner", {"model_family": "sdxl", "lora_rank": 16}, rows)


def onetrainer(tmp: Path, run: Run) -> Path:
    directory = tmp / "workspace" / "tensorboard" / "2026-11-25_12-00-00"
    with SummaryWriter(str(directory)) as writer:
        ema = None
        for i, (loss, lr) in enumerate(zip(run.loss, run.lr, strict=True)):
            if math.isnan(loss):  # OneTrainer raises before logging a NaN loss
                break
            ema = loss if ema is None else 0.99 * ema + 0.01 * loss
            writer.add_scalar("lr/unet", lr, i + 1)
            writer.add_scalar("loss/train_step", loss, i + 1)
            writer.add_scalar("smooth_loss/train_step", ema, i + 1)
            if i + 1 in run.val:  # one validation concept: no total_average
                writer.add_scalar("loss/validation_step/val-dogs", run.val[i + 1], i + 1)
    return tmp / "workspace" / "tensorboard"


def wandb_history(tmp: Path, run: Run) -> Path:
    files = tmp / "wandb" / "run-20261125_120000-abc123" / "files"
    files.mkdir(parents=True)
    with (files / "wandb-history.jsonl").open("w") as fh:
        for i, (loss, lr) in enumerate(zip(run.loss, run.lr, strict=True)):
            row = {"epoch": i // 200, "loss": loss, "lr": lr, "ema_decay": 0.999,
                   "_step": i, "_runtime": 0.5 * i, "_timestamp": 1.79e9 + 0.5 * i}
            fh.write(json.dumps(row) + "\n")  # NaN written as NaN, as the SDK's encoder does
    (files / "config.yaml").write_text(yaml.safe_dump({
        "_wandb": {"desc": None, "value": {"cli_version": "0.19.0"}},
        "lr": {"desc": None, "value": LR}}))
    return tmp / "wandb"


def wandb_offline(tmp: Path, run: Run) -> Path:
    """k-diffusion's wandb.log calls, made by the real W&B SDK in offline mode (current SDKs
    keep the history in run-<id>.wandb only)."""
    import wandb

    os.environ.update(WANDB_SILENT="true", WANDB_DISABLE_GIT="true")
    config = {"lr": LR, "model": {"type": "image_v1"}}
    with wandb.init(project="k-diffusion", mode="offline", dir=str(tmp), config=config) as wb:
        for i, (loss, lr) in enumerate(zip(run.loss, run.lr, strict=True)):
            wb.log({"epoch": i // 200, "loss": loss, "lr": lr, "ema_decay": 0.999}, step=i)
    return tmp / "wandb"


def k_diffusion_csv(tmp: Path, run: Run) -> Path:
    path = tmp / "kdiff_metrics.csv"
    lines, ema = ["step,time,loss,fid,kid"], None
    for i, loss in enumerate(run.loss):
        ema = loss if ema is None else 0.99 * ema + 0.01 * loss  # ema_stats['loss']
        if (i + 1) % 25 == 0:  # every --evaluate-every steps
            lines.append(f"{i + 1},{0.5 * i:g},{ema:g},{30 - i / 30:g},{0.02:g}")
    path.write_text("\n".join(lines) + "\n")
    return path


def wandb_csv(tmp: Path, run: Run) -> Path:
    path = tmp / "wandb_export_2026-11-25.csv"
    lines = ['"Step","sd-lora - train_loss","sd-lora - train_loss__MIN","sd-lora - train_loss__MAX"']
    lines += [f'"{i}","{v}","{v - 0.01}","{v + 0.01}"' for i, v in enumerate(run.loss)]
    path.write_text("\n".join(lines) + "\n")
    return path


def mlflow_store(tmp: Path, run: Run) -> Path:
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    import mlflow

    uri = (tmp / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run():
        mlflow.log_params({"learning_rate": LR, "prediction_type": "epsilon"})
        for i, (loss, lr, g) in enumerate(zip(run.loss, run.lr, run.grad, strict=True)):
            mlflow.log_metrics({"train_loss": loss, "lr": lr, "grad_norm": g}, step=i + 1)
    return tmp / "mlruns"


def ai_toolkit(tmp: Path, run: Run) -> Path:
    """ai-toolkit's UILogger: loss_log.db in WAL mode, its three tables, and per committed
    step an upsert into each (ostris/ai-toolkit toolkit/logging_aitk.py); a NaN is bound as a
    Python float, which SQLite stores as NULL."""
    import sqlite3

    job = tmp / "output" / "my_flux_lora"
    job.mkdir(parents=True)
    con = sqlite3.connect(job / "loss_log.db", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL;")
    con.execute("CREATE TABLE steps (step INTEGER PRIMARY KEY, wall_time REAL NOT NULL)")
    con.execute("CREATE TABLE metric_keys (key TEXT PRIMARY KEY, first_seen_step INTEGER, "
                "last_seen_step INTEGER)")
    con.execute("CREATE TABLE metrics (step INTEGER NOT NULL, key TEXT NOT NULL, value_real "
                "REAL, value_text TEXT, PRIMARY KEY (step, key), FOREIGN KEY (step) "
                "REFERENCES steps(step) ON DELETE CASCADE)")
    for i, (loss, lr) in enumerate(zip(run.loss, run.lr, strict=True)):
        con.execute("INSERT INTO steps(step, wall_time) VALUES(?, ?) ON CONFLICT(step) DO "
                    "UPDATE SET wall_time=excluded.wall_time", (i, 1.79e9 + i))
        validation = (("val/loss", run.val[i]),) if i in run.val else ()
        for key, value in (("learning_rate", lr), ("loss/loss", loss)) + validation:
            con.execute("INSERT INTO metrics(step, key, value_real, value_text) "
                        "VALUES(?, ?, ?, ?)", (i, key, value, None))
            con.execute("INSERT INTO metric_keys VALUES(?, ?, ?) ON CONFLICT(key) DO UPDATE "
                        "SET last_seen_step=excluded.last_seen_step", (key, i, i))
    con.close()
    return job


def simpletuner_local(tmp: Path, run: Run) -> Path:
    """SimpleTuner's local tracker (report_to: simpletuner): one sorted, compact JSON object per
    log call; non-finite values are dropped (local_metrics.py _coerce_scalar); the manifest
    keeps the main settings."""
    out = tmp / "output" / "sdxl-lora"
    out.mkdir(parents=True)
    with (out / "training_metrics.jsonl").open("w") as fh:
        for i, (loss, lr, g) in enumerate(zip(run.loss, run.lr, run.grad, strict=True)):
            metrics = {k: v for k, v in (("train_loss", loss), ("learning_rate", lr),
                                         ("grad_norm", g), ("epoch", 1 + i // 200),
                                         ("loss/val/eval-cats", run.val.get(i + 1, math.inf)))
                       if math.isfinite(v)}
            fh.write(json.dumps({"schema_version": 1, "timestamp": "2026-11-25T12:00:00+00:00",
                                 "step": i + 1, "metrics": metrics},
                                separators=(",", ":"), sort_keys=True) + "\n")
    (out / "training_metrics.json").write_text(json.dumps({
        "schema_version": 1, "status": "running", "config": {
            "model_family": "sdxl", "learning_rate": LR,
            "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0"}}))
    return out


def diffsynth_csv(tmp: Path, run: Run) -> Path:
    """DiffSynth-Studio's long-format loss.csv: step,key,value."""
    path = tmp / "loss.csv"
    path.write_text("step,key,value\n" + "".join(f"{i + 1},loss,{v}\n"
                                                 for i, v in enumerate(run.loss)))
    return path


QUANTILES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # TIMESTEP_QUANTILES_FOR_EVAL


def diffusion_pipe(tmp: Path, run: Run) -> Path:
    """diffusion-pipe's TensorBoard writer (train.py): train/loss and train/grad_norm every
    logging step, train/epoch_loss on the epoch axis, and an eval at 9 timestep quantiles."""
    directory = tmp / "output" / "20261125_12-00-00"
    epoch_loss = []
    with SummaryWriter(str(directory)) as writer:
        for i, (loss, g) in enumerate(zip(run.loss, run.grad, strict=True)):
            writer.add_scalar("train/loss", loss, i + 1)
            writer.add_scalar("train/grad_norm", g, i + 1)
            epoch_loss.append(loss)
            if (i + 1) % 200 == 0:
                writer.add_scalar("train/epoch_loss", sum(epoch_loss) / 200, (i + 1) // 200)
                epoch_loss = []
            if i + 1 in run.val:
                losses = [run.val[i + 1] * (1.6 - q) for q in QUANTILES]  # noisier: lower
                for q, value in zip(QUANTILES, losses, strict=True):
                    writer.add_scalar(f"eval/loss_quantile_{q:.2f}", value, i + 1)
                writer.add_scalar("eval/loss", sum(losses) / len(losses), i + 1)
                writer.add_scalar("eval/eval_time_sec", 3.0, i + 1)
    return directory


def ltx_trainer(tmp: Path, run: Run) -> Path:
    """LTX-2's ltx-trainer (packages/ltx-trainer/src/ltx_trainer/trainer.py): per optimization
    step ``wandb_run.log({train/loss, train/learning_rate, train/step_time, train/global_step})``
    plus the loss per sigma bucket (sigma_tracker.py), by the real W&B SDK in offline mode."""
    import wandb

    os.environ.update(WANDB_SILENT="true", WANDB_DISABLE_GIT="true")
    config = {"optimization": {"learning_rate": LR, "max_grad_norm": 1.0},
              "acceleration": {"mixed_precision_mode": "bf16"}}
    rng = random.Random(1)
    with wandb.init(project="ltx-2", mode="offline", dir=str(tmp), config=config) as wb:
        for i, (loss, lr) in enumerate(zip(run.loss, run.lr, strict=True)):
            bucket = f"{int(rng.random() * 4) / 4:.2f}-{int(rng.random() * 4) / 4 + 0.25:.2f}"
            wb.log({"train/loss": loss, "train/learning_rate": lr, "train/step_time": 1.2,
                    "train/global_step": i + 1, f"train/loss_sigma_{bucket}": loss})
    return tmp / "wandb"


def open_sora(tmp: Path, run: Run) -> Path:
    """Open-Sora's wandb.log (scripts/diffusion/train.py): loss, avg_loss, lr and
    global_grad_norm at each logged update step, here in an older SDK's history file."""
    files = tmp / "wandb" / "run-20261125_120000-sora01" / "files"
    files.mkdir(parents=True)
    running = []
    with (files / "wandb-history.jsonl").open("w") as fh:
        for i, (loss, lr, g) in enumerate(zip(run.loss, run.lr, run.grad, strict=True)):
            running.append(loss)
            fh.write(json.dumps({"iter": i, "epoch": 0, "loss": loss,
                                 "avg_loss": sum(running[-10:]) / len(running[-10:]), "lr": lr,
                                 "global_grad_norm": g, "_step": i + 1}) + "\n")
    return tmp / "wandb"


WRITERS = {"kohya": kohya, "diffusers-lora": diffusers_lora,
           "diffusers-unconditional": diffusers_unconditional, "simpletuner": simpletuner,
           "onetrainer": onetrainer, "k-diffusion-wandb": wandb_history,
           "k-diffusion-wandb-offline": wandb_offline,
           "k-diffusion-csv": k_diffusion_csv, "wandb-csv": wandb_csv, "mlflow": mlflow_store,
           "ai-toolkit": ai_toolkit, "simpletuner-local": simpletuner_local,
           "diffsynth-csv": diffsynth_csv, "diffusion-pipe": diffusion_pipe,
           "ltx-trainer": ltx_trainer, "open-sora": open_sora}
TRAINER_LABELS = {"kohya": "kohya-ss sd-scripts", "onetrainer": "OneTrainer",
                  "simpletuner": "SimpleTuner", "k-diffusion-wandb": "k-diffusion (W&B)",
                  "k-diffusion-wandb-offline": "k-diffusion (W&B)",
                  "k-diffusion-csv": "k-diffusion (its *_metrics.csv)",
                  "diffusers-unconditional": "diffusers train_unconditional.py",
                  "ai-toolkit": "ai-toolkit (its loss_log.db)", "simpletuner-local": "SimpleTuner",
                  "diffusion-pipe": "diffusion-pipe", "open-sora": "Open-Sora",
                  "ltx-trainer": "LTX-2 trainer (ltx-trainer)"}
GRAD_LOGGED = {"simpletuner", "mlflow", "simpletuner-local", "diffusion-pipe", "open-sora"}
VALIDATED = {"kohya": "loss/validation/step_average", "onetrainer":
             "loss/validation_step/val-dogs", "simpletuner": "loss/val/eval-cats",
             "ai-toolkit": "val/loss", "simpletuner-local": "loss/val/eval-cats",
             "diffusion-pipe": "eval/loss"}


def codes(path: Path, **kwargs) -> set[str]:
    return {f.code for f in diagnose_log(path, **kwargs).findings}


@pytest.mark.parametrize("name", WRITERS)
def test_a_healthy_run_of_every_format_raises_nothing(tmp_path, name):
    path = WRITERS[name](tmp_path, make_run("healthy"))
    diagnosis = diagnose_log(path)
    assert diagnosis.findings == [] and diagnosis.scenario == "healthy"
    if name in TRAINER_LABELS:
        assert diagnosis.trainer == TRAINER_LABELS[name]
    missing = {m.tag for m in diagnosis.missing}
    assert {vm.COS_EPS, vm.Z_STD, vm.T_MEAN} <= missing  # no foreign trainer logs these
    assert (vm.GRAD_NORM in missing) == (name not in GRAD_LOGGED)
    assert "observe" in diagnosis.hook


@pytest.mark.parametrize("name", WRITERS)
def test_a_diverging_run_of_every_format_is_caught(tmp_path, name):
    found = codes(WRITERS[name](tmp_path, make_run("diverging")))
    if name == "onetrainer":  # it stops before logging a NaN loss: no grad norm, no NaN
        assert found == set()
        return
    if name == "simpletuner-local":  # it drops non-finite values: the grad norm tells
        assert found == {"grad_norm_exploding"}
        return
    assert "loss_nonfinite" in found
    assert ("grad_norm_exploding" in found) == (name in GRAD_LOGGED)


@pytest.mark.parametrize("name", WRITERS)
def test_a_stuck_run_of_every_format_is_caught(tmp_path, name):
    diagnosis = diagnose_log(WRITERS[name](tmp_path, make_run("stuck")))
    validated = ["validation_stuck"] if name in VALIDATED else []
    assert sorted(f.code for f in diagnosis.findings) == sorted(["loss_stuck_high"] + validated)


@pytest.mark.parametrize("name", VALIDATED)
def test_an_over_fitting_run_of_every_trainer_that_validates_is_caught(tmp_path, name):
    """Their validation loss rises over three validations while the training loss falls; the
    training loss is drawn at random noise levels, so the gap test, which compares the same
    points, is never applied to it."""
    diagnosis = diagnose_log(WRITERS[name](tmp_path, make_run("overfitting")))
    (finding,) = diagnosis.findings
    assert finding.code == "overfitting" and diagnosis.tags_read(finding) == [VALIDATED[name]]
    assert "above its minimum while the training loss fell" in finding.message
    assert "same noise on training images" not in finding.message
    assert any(note.startswith("validation loss: ") for note in diagnosis.notes)
    healthy = diagnose_log(WRITERS[name](tmp_path / "healthy", make_run("healthy")))
    assert read_log(healthy.source).series[vm.VAL_LOSS] and healthy.findings == []


def test_a_validation_on_the_training_images_never_reads_as_over_fitting(tmp_path):
    """Fixed timesteps on training images measure fit: that loss falls with the training
    loss however long the run over-fits, so it raises nothing (the held-out one did)."""
    run = make_run("overfitting")
    run.val = {s: 0.9 * run.loss[s - 1] for s in run.val}
    assert diagnose_log(ai_toolkit(tmp_path, run)).findings == []


def test_diffusion_pipe_quantiles_become_noise_levels_by_its_timestep_sampling(tmp_path):
    run = make_run("overfitting")
    log = read_log(diffusion_pipe(tmp_path / "default", run))
    levels = vm.noise_levels_in(log.series)
    # logit-normal by default (models/flux.py): t = sigmoid(Phi^-1(q))
    assert [level.label for level in levels] == [f"t {t}" for t in (
        "0.22", "0.3", "0.37", "0.44", "0.5", "0.56", "0.63", "0.7", "0.78")]
    assert any("quantile levels as t by logit-normal" in note for note in log.notes)
    directory = diffusion_pipe(tmp_path / "uniform", run)
    (directory / "flux.toml").write_text("output_dir = '/runs'\n[model]\ntype = 'flux'\n"
                                          "timestep_sample_method = 'uniform'\nshift = 3\n")
    (directory / "dataset.toml").write_text("[[directory]]\npath = '/data'\nnum_repeats = 1\n")
    levels = vm.noise_levels_in(read_log(directory).series)
    assert levels[0].label == "t 0.25" and levels[4].label == "t 0.75"  # shifted by 3
    (finding,) = diagnose_log(directory).findings
    assert "held-out loss rose most at every noise level logged (t 0.25 to 0.96)" \
        in finding.message
    assert noise_levels(levels[:2], levels) == "t in 0.25 and 0.43 (low noise: the detail)"


def test_onetrainer_total_over_its_validation_concepts_is_the_validation_loss(tmp_path):
    directory = tmp_path / "workspace" / "tensorboard" / "run"
    with SummaryWriter(str(directory)) as writer:
        for step in range(1, 301):
            writer.add_scalar("loss/train_step", 0.1, step)
            if step % 100 == 0:
                for name, value in (("dogs", 0.2), ("cats", 0.4), ("total_average", 0.3)):
                    writer.add_scalar(f"loss/validation_step/{name}", value, step)
    log = read_log(directory)
    assert log.read_from[vm.VAL_LOSS] == ["loss/validation_step/total_average"]
    assert [v for _, v in log.series[vm.VAL_LOSS]] == pytest.approx([0.3] * 3)
    assert log.series["validation/set/cats/loss"][0][1] == pytest.approx(0.4)


@pytest.mark.parametrize("name", WRITERS)
def test_a_low_flat_fine_tune_is_not_called_too_low(tmp_path, name):
    path = WRITERS[name](tmp_path, make_run("finetune"))
    diagnosis = diagnose_log(path)
    assert diagnosis.regime == "finetune" and diagnosis.findings == []
    # the same log judged as a run from scratch: the guide's "< 0.01: overfitting or leakage"
    assert codes(path, mode="pretrain") == {"loss_too_low"}


def test_kohya_epoch_and_smoothed_losses_are_never_read_as_steps(tmp_path):
    log = read_log(kohya(tmp_path, make_run("healthy")))
    assert [s for s, _ in log.series[vm.LOSS_EPOCH]] == [1, 2, 3]  # the epoch axis, kept apart
    assert len(log.series[vm.LOSS]) == STEPS and log.series[vm.LOSS][0][0] == 1
    assert log.read_from[vm.LOSS] == ["loss/current"]
    assert log.read_from[vm.LOSS_SMOOTHED] == ["loss/average"]
    assert log.read_from[vm.LEARNING_RATE] == ["lr/unet"]  # the backbone's group is the rate
    assert log.series[vm.LEARNING_RATE + "/textencoder"][-1][1] == pytest.approx(LR / 2)
    assert log.config["network_module"] == "networks.lora"  # accelerate's hparams.yml


def test_a_smoothed_loss_alone_is_judged_on_its_level_and_says_so(tmp_path):
    diagnosis = diagnose_log(k_diffusion_csv(tmp_path, make_run("stuck")))
    assert [(f.code, f.metric) for f in diagnosis.findings] == [("loss_stuck_high",
                                                                vm.LOSS_SMOOTHED)]
    loss = next(m for m in diagnosis.missing if m.tag == vm.LOSS)
    assert "moving average" in loss.reveals


def test_json_names_the_tags_each_finding_read(tmp_path, capsys):
    path = kohya(tmp_path, make_run("stuck"))
    assert main(["diagnose", str(path), "--json", "--fail-on", "warning"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["trainer"] == "kohya-ss sd-scripts" and out["regime"] == "finetune"
    assert "network_module" in out["regime_reason"] or "pretrained" in out["regime_reason"]
    assert out["findings"][0]["tags_read"] == ["loss/current"]
    fix = out["findings"][0]["fix"]  # in kohya's own flags, not ldmkit's config keys
    assert "--learning_rate" in fix and "train.lr" not in fix
    assert vm.COS_EPS in {m["tag"] for m in out["missing_vitals"]}
    table_code = main(["diagnose", str(path), "--fail-on", "never"])
    text = capsys.readouterr().out
    assert table_code == 0 and "[loss/current]" in text and "not logged, so not judged" in text
    assert "AccelerateVitals" in text


def test_objective_and_min_snr_come_from_the_config(tmp_path):
    """A v-prediction run with min-SNR weighting: its loss units are read from the config, so
    a loss that sits at its untrained level is still caught as stuck."""
    from ldmkit.diffusion.parameterization import Parameterization

    untrained = Parameterization("v", weighting="min_snr", min_snr_gamma=5.0).untrained_loss()
    run = make_run("stuck")
    run.loss = [untrained * v for v in run.loss]
    path = accelerate_log(tmp_path, "text2image-fine-tune",
                          {"prediction_type": "v_prediction", "snr_gamma": 5.0},
                          [(i + 1, {"train_loss": v}) for i, v in enumerate(run.loss)])
    assert codes(path) == {"loss_stuck_high"}
    assert untrained < 0.9  # in eps units the same values would not look stuck
    assert codes(path, objective="eps") == set()


def replace_line(path: Path, index: int, text: str) -> Path:
    """``path`` with its line ``index`` (0-based) replaced by ``text``: a damaged middle line."""
    lines = path.read_text().splitlines()
    lines[index] = text
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("damage", ["wandb-line", "csv-step", "mlflow-line", "tfevents",
                                    "wandb-config", "wandb-log"])
def test_unreadable_files_give_one_line_naming_the_file(tmp_path, capsys, damage):
    if damage == "wandb-line":
        root = wandb_history(tmp_path, make_run("healthy"))
        culprit = replace_line(next(root.rglob("wandb-history.jsonl")), 3, '{"loss": 0.5')
    elif damage == "wandb-config":
        root = wandb_history(tmp_path, make_run("healthy"))
        culprit = next(root.rglob("config.yaml"))
        culprit.write_text("lr: {desc: [unclosed\n")
    elif damage == "wandb-log":
        root = wandb_offline(tmp_path, make_run("healthy"))
        culprit = next(root.rglob("*.wandb"))
        culprit.write_bytes(b"PK\x03\x04" + culprit.read_bytes()[4:])
    elif damage == "csv-step":
        root = culprit = replace_line(k_diffusion_csv(tmp_path, make_run("healthy")), 2,
                                      "x,1,0.5,3,0.1")
    elif damage == "mlflow-line":
        root = mlflow_store(tmp_path, make_run("healthy"))
        culprit = replace_line(next(root.rglob("metrics/train_loss")), 1, "garbage")
    else:
        root = tmp_path / "tb"
        root.mkdir()
        culprit = root / "events.out.tfevents.1.host"
        culprit.write_bytes(b"\x00\x01 not an event file" * 10)
    assert main(["diagnose", str(root)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(culprit) in err


@pytest.mark.parametrize("name", ["k-diffusion-wandb", "k-diffusion-csv", "mlflow",
                                  "k-diffusion-wandb-offline"])
def test_a_torn_last_record_of_a_live_log_is_read_up_to_it(tmp_path, name):
    root = WRITERS[name](tmp_path, make_run("healthy"))
    target = {"k-diffusion-wandb": lambda: next(root.rglob("wandb-history.jsonl")),
              "k-diffusion-wandb-offline": lambda: next(root.rglob("*.wandb")),
              "k-diffusion-csv": lambda: root,
              "mlflow": lambda: next(root.rglob("metrics/train_loss"))}[name]()
    data = target.read_bytes()
    target.write_bytes(data[:-7])  # the writer was killed mid-record
    assert diagnose_log(root).findings == []


def test_ai_toolkit_db_damaged_or_locked_is_one_line_and_a_live_one_is_read(tmp_path, capsys):
    """loss_log.db is read read-only while ai-toolkit writes it (WAL); a truncated file and a
    database an exclusive writer holds are one-line errors naming it."""
    import sqlite3

    job = ai_toolkit(tmp_path / "live", make_run("healthy"))
    db = job / "loss_log.db"
    writer = sqlite3.connect(db, isolation_level=None)  # the trainer, still running
    writer.execute("BEGIN")
    writer.execute("INSERT INTO steps VALUES (9999, 0)")
    assert diagnose_log(job).findings == []  # what was committed, read beside the writer
    writer.execute("ROLLBACK")
    writer.execute("PRAGMA locking_mode=EXCLUSIVE")
    writer.execute("BEGIN EXCLUSIVE")
    assert main(["diagnose", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(db) in err[0] and "ai-toolkit" in err[0]
    writer.close()
    truncated = tmp_path / "loss_log.db"
    truncated.write_bytes(db.read_bytes()[:3000])
    assert main(["diagnose", str(truncated)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(truncated) in err[0]


def test_a_simpletuner_jsonl_torn_mid_line_is_read_up_to_it(tmp_path):
    out = simpletuner_local(tmp_path, make_run("healthy"))
    path = out / "training_metrics.jsonl"
    path.write_bytes(path.read_bytes()[:-9])
    log = read_log(out)
    assert log.trainer.name == "simpletuner" and len(log.series[vm.LOSS]) == STEPS - 1
    assert log.config["model_family"] == "sdxl"


def test_the_folder_a_trainer_wrote_into_is_searched_and_the_newest_log_read(tmp_path, capsys):
    """Users pass the project folder: the one holding wandb/ and mlruns/, k-diffusion's output
    folder with NAME_metrics.csv, ai-toolkit's output/<job>/loss_log.db. The newest log is read
    and the diagnosis says which, and what else it found."""
    project = tmp_path / "project"
    project.mkdir()
    wandb_history(project, make_run("healthy"))
    os.utime(next((project / "wandb").rglob("wandb-history.jsonl")), (1.7e9, 1.7e9))
    ai_toolkit(project, make_run("stuck"))  # project/output/my_flux_lora/loss_log.db
    diagnosis = diagnose_log(project)
    assert diagnosis.trainer == "ai-toolkit (its loss_log.db)"
    assert [f.code for f in diagnosis.findings] == ["loss_stuck_high", "validation_stuck"]
    assert diagnosis.notes[0].startswith(f"'{project}' holds 2 logs: read the newest, "
                                         f"'{project / 'output' / 'my_flux_lora'}'")
    assert f"also found '{project / 'wandb'}'" in diagnosis.notes[0]
    kdiff = tmp_path / "kdiff"
    kdiff.mkdir()
    k_diffusion_csv(kdiff, make_run("healthy"))
    assert diagnose_log(kdiff).trainer == "k-diffusion (its *_metrics.csv)"
    assert main(["diagnose", str(tmp_path / "kdiff" / "..")]) in (0, 1)
    assert "holds 2 logs: read the newest" in capsys.readouterr().out


def test_onetrainer_tags_from_before_2024_09_are_read(tmp_path):
    """OneTrainer's older runs log loss/loss and loss/smooth loss: the step loss is judged, the
    EMA kept apart (not ai-toolkit's loss/loss, which comes with learning_rate)."""
    directory = tmp_path / "workspace" / "tensorboard"
    run = make_run("stuck")
    with SummaryWriter(str(directory)) as writer:
        for i, loss in enumerate(run.loss):
            writer.add_scalar("loss/loss", loss, i + 1)
            writer.add_scalar("loss/smooth loss", loss, i + 1)
            writer.add_scalar("lr/unet", run.lr[i], i + 1)
    diagnosis = diagnose_log(directory)
    assert diagnosis.trainer == "OneTrainer"
    assert [f.code for f in diagnosis.findings] == ["loss_stuck_high"]
    assert diagnosis.read_from[vm.LOSS_SMOOTHED] == ["loss/smooth loss"]


def test_a_nan_in_an_fp16_run_is_blamed_on_fp16_first(tmp_path):
    """The most reported NaN in these trainers comes from fp16's range: where the run's config
    says fp16, the fix says bf16 before a lower learning rate; in bf16 it does not."""
    run = make_run("diverging")
    rows = [(i + 1, {"loss/current": v, "lr/unet": lr})
            for i, (v, lr) in enumerate(zip(run.loss, run.lr, strict=True))]
    fp16 = accelerate_log(tmp_path / "fp16", "network_train",
                          {"mixed_precision": "fp16", "learning_rate": LR}, rows)
    fix = {f.code: f.fix for f in diagnose_log(fp16).findings}["loss_nonfinite"]
    assert fix.startswith("the run computes in fp16 (mixed_precision = fp16)")
    assert "train in bf16 first" in fix and "--learning_rate" in fix
    bf16 = accelerate_log(tmp_path / "bf16", "network_train",
                          {"mixed_precision": "bf16", "learning_rate": LR}, rows)
    assert "fp16" not in {f.code: f.fix for f in diagnose_log(bf16).findings}["loss_nonfinite"]


def test_a_nan_in_an_ltx_trainer_run_in_fp16_is_blamed_on_fp16_first(tmp_path, monkeypatch):
    """Its config reaches W&B nested (acceleration: {mixed_precision_mode: fp16})."""
    import wandb

    real_init = wandb.init

    def fp16_init(**kwargs):
        kwargs["config"]["acceleration"]["mixed_precision_mode"] = "fp16"
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", fp16_init)
    findings = diagnose_log(ltx_trainer(tmp_path, make_run("diverging"))).findings
    fix = {f.code: f.fix for f in findings}["loss_nonfinite"]
    assert fix.startswith("the run computes in fp16 (acceleration.mixed_precision_mode = fp16)")
    assert "optimization.learning_rate" in fix  # then ltx-trainer's own setting


def test_sd_scripts_nan_key_norm_without_ggpo_is_no_divergence(tmp_path):
    """sd-scripts logs norm/avg_key_norm as NaN when its GGPO option is off (kohya-ss/
    sd-scripts #2063): a healthy run with that NaN raises nothing."""
    run = make_run("healthy")
    rows = [(i + 1, {"loss/current": v, "lr/unet": lr, "norm/avg_key_norm": float("nan")})
            for i, (v, lr) in enumerate(zip(run.loss, run.lr, strict=True))]
    diagnosis = diagnose_log(accelerate_log(tmp_path, "network_train",
                                            {"learning_rate": LR}, rows))
    assert diagnosis.findings == [] and diagnosis.trainer == "kohya-ss sd-scripts"


def test_ai_toolkit_db_is_polled_for_added_steps_and_read_again_when_a_resume_rewrote_them(
        tmp_path):
    """A poll reads the rows of steps after the last one read; a resumed run deletes the steps
    after its resume step (toolkit/logging_aitk.py _prune_future_steps: DELETE FROM steps,
    metrics cascade) and logs them again with new wall times: the source then reads the whole
    log again, so no row of the abandoned steps survives."""
    import sqlite3

    from ldmkit.vitals.logs.sources import AitkSource
    from ldmkit.vitals.logs.trainer_files import read_aitk

    db = ai_toolkit(tmp_path, make_run("healthy")) / "loss_log.db"
    source = AitkSource(db)
    rows = len(source.poll().records)
    assert rows == 2 * STEPS + 5 and source.poll() is None  # loss, lr; val/loss at 100 ... 500
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA foreign_keys=ON")

    def log(step: int, loss: float) -> None:
        con.execute("INSERT INTO steps VALUES (?, ?) ON CONFLICT(step) DO UPDATE SET "
                    "wall_time=excluded.wall_time", (step, 2.0e9 + step))
        con.execute("INSERT INTO metrics VALUES (?, 'loss/loss', ?, NULL)", (step, loss))

    mark = source.mark
    log(600, 0.2)
    os.utime(db, (2.1e9, 2.1e9))
    added, _, whole = read_aitk(db, mark)
    assert added.records == [(600, "loss/loss", 0.2)] and not whole
    assert len(source.poll().records) == rows + 1
    con.execute("DELETE FROM steps WHERE step > 300")  # resumed from step 300
    for step in range(301, 700):
        log(step, 9.0)
    con.close()
    os.utime(db, (2.2e9, 2.2e9))
    raw = source.poll()
    losses = [(s, v) for s, tag, v in raw.records if tag == "loss/loss"]
    assert [s for s, _ in losses] == list(range(700))  # each step once
    assert all(v == 9.0 for s, v in losses if s > 300)
