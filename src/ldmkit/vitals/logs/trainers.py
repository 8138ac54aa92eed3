"""Other trainers' logs as the guide's vital signs: one table of tag maps, one row a tag.

Each ``TagMap`` says what a trainer writes, under which name, and where in its source (cited,
never copied); ``kind`` keeps a moving average (``smoothed``) or an epoch mean on an epoch axis
(``epoch``) from ever being read as one step's loss. Which trainer wrote a log is told by the
tags only it writes (``Trainer.signatures``); the regime (pretraining or fine-tuning) and the
objective come from the run's saved config where there is one, else from the log itself, so a
LoRA whose loss starts and stays at 0.1 is judged as the fine-tune it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ldmkit.vitals import tags as vm
from ldmkit.vitals.logs.validation_sets import (
    QUANTILE,
    SET_PREFIX,
    QuantileToT,
    diffusion_pipe_t,
    main_validation,
    training_side,
)

Kind = Literal["step", "smoothed", "epoch"]
Regime = Literal["pretrain", "finetune"]
GROUP = "{group}"  # in a TagMap's tag: filled with what the foreign tag's trailing '*' matched
SET = "{set}"  # ... and with what its leading '*' matched (an eval set's name)
LR_GROUP = vm.LEARNING_RATE + "/" + GROUP


@dataclass(frozen=True)
class TagMap:
    foreign: str  # as the trainer logs it; a leading or trailing '*' matches any rest
    tag: str  # ours
    kind: Kind
    source: str  # the file of that trainer's source that writes it


@dataclass(frozen=True)
class Trainer:
    name: str
    label: str
    signatures: tuple[frozenset[str], ...]  # any one set of tags all present: this trainer
    tags: tuple[TagMap, ...]
    regime: Regime | None  # None: from its config or its log
    hook: str  # where the live vital signs go in its loop
    main_lr_groups: tuple[str, ...] = ("unet", "transformer", "prior", "group0")
    # ldmkit's setting names in the rules' fixes -> this trainer's names for the same settings
    settings: tuple[tuple[str, str], ...] = ()
    validation: str = ""  # what its validation loss measures, and on which images
    quantile_to_t: QuantileToT | None = None  # its validation levels' quantiles as t

    @property
    def names(self) -> dict[str, str]:
        """ldmkit's setting names -> this trainer's, for rendering a remedy's text."""
        return dict(self.settings)


def _sig(*sets: tuple[str, ...]) -> tuple[frozenset[str], ...]:
    return tuple(frozenset(s) for s in sets)


# the fixes quote ldmkit's settings; these are the same settings' names in the other trainers
WORDS = (("train.warmup_steps", "the warmup steps"), ("warmup_steps", "the warmup steps"),
         ("diffusion.latent_scale_factor", "the latent scale factor"),
         ("train.lr", "the learning rate"), ("grad_clip", "gradient clipping"),
         ("data.val_fraction", "a held-out validation set"))
FLAGS = (("train.warmup_steps", "--lr_warmup_steps"), ("warmup_steps", "--lr_warmup_steps"),
         ("diffusion.latent_scale_factor", "the VAE's scaling_factor"),
         ("train.lr", "--learning_rate"), ("grad_clip", "--max_grad_norm"),
         ("data.val_fraction", "a held-out validation set"))
KOHYA = "kohya-ss/sd-scripts "
AITK = "ostris/ai-toolkit "
PIPE = "tdrussell/diffusion-pipe train.py "
SORA = "hpcaitech/Open-Sora scripts/diffusion/train.py "
LTX = "Lightricks/LTX-2 packages/ltx-trainer/src/ltx_trainer/"
DIFFUSERS = "huggingface/diffusers examples/"
ACCELERATE_HOOK = """\
from ldmkit.integrations.accelerate import AccelerateVitals
vitals = AccelerateVitals(accelerator, noise_scheduler, latent_scale_factor={scale})
# where the loop has computed the loss; grad_norm = accelerator.clip_grad_norm_(...):
vitals.observe(global_step, loss, {pred}, noise, timesteps, latents,
               noisy_latents=noisy_latents, grad_norm=grad_norm)"""

K_DIFFUSION_HOOK = """\
from ldmkit.vitals.observer import VitalsMonitor
vitals = VitalsMonitor(f"{args.name}_vitals")
# train.py, after losses = model.loss(reals, noise, sigma, ...), with the denoiser's eps_pred
vitals.observe_train_step(step, losses.mean(), eps_pred, noise, t, reals)"""

FLOW_HOOK = """\
from ldmkit.vitals.observer import VitalsMonitor
vitals = VitalsMonitor({directory})
# {where}; a flow model predicts v = eps - x_0, so eps = x_t + (1 - t) v
eps_pred = x_t + (1 - t).reshape(-1, *[1] * (v_pred.dim() - 1)) * v_pred
vitals.observe_train_step(step, loss, eps_pred, noise, t, latents)"""

TRAINERS: tuple[Trainer, ...] = (
    Trainer("kohya", "kohya-ss sd-scripts",
            _sig(("loss/current",), ("loss/epoch",), ("loss", "lr/unet")), (
                TagMap("loss/current", vm.LOSS, "step", KOHYA + "train_network.py "
                       "(NetworkTrainer.generate_step_logs)"),
                TagMap("loss", vm.LOSS, "step", KOHYA + "fine_tune.py, train_db.py, "
                       "sdxl_train.py (logs = {'loss': current_loss})"),
                TagMap("loss/average", vm.LOSS_SMOOTHED, "smoothed", KOHYA + "train_network.py "
                       "(library/train_util.py LossRecorder.moving_average)"),
                TagMap("loss/epoch_average", vm.LOSS_EPOCH, "epoch", KOHYA + "train_network.py "
                       "(epoch_logging: the epoch as the step)"),
                TagMap("loss/epoch", vm.LOSS_EPOCH, "epoch", KOHYA + "fine_tune.py, train_db.py "
                       "(accelerator.log(..., step=epoch + 1))"),
                TagMap("loss/validation/step_average", vm.VAL_LOSS, "step", KOHYA +
                       "train_network.py (every validate_every_n_steps: LossRecorder of the "
                       "validation split at 4 fixed timesteps)"),
                TagMap("loss/validation/epoch_average", vm.VAL_PREFIX + "epoch_average", "epoch",
                       KOHYA + "train_network.py (epoch validation; epoch_logging: the epoch "
                       "as the TensorBoard step)"),
                TagMap("lr/d*lr/*", vm.LEARNING_RATE + "/d*lr/" + GROUP, "step",
                       KOHYA + "train_network.py (DAdaptation/Prodigy's effective rate)"),
                TagMap("lr/*", LR_GROUP, "step", KOHYA + "train_network.py, "
                       "library/train_util.py append_lr_to_logs (one per parameter group)"),
            ), "finetune",
            ACCELERATE_HOOK.format(scale="self.vae_scale_factor", pred="noise_pred")
            + "\n# train_network.py: in process_batch, after get_noise_pred_and_target",
            settings=FLAGS[:-1] + (("data.val_fraction", "--validation_split"),),
            validation="the --validation_split images, held out of training, at timesteps "
                       "200, 400, 600 and 800 of 1000; its LossRecorder (library/train_util.py) keeps "
                       "the first epoch's entries, so the value is a mean with earlier "
                       "validations and lags a rise"),
    Trainer("onetrainer", "OneTrainer", _sig(("loss/train_step",), ("loss/smooth loss",)), (
        TagMap("loss/train_step", vm.LOSS, "step", "Nerogar/OneTrainer "
               "modules/trainer/GenericTrainer.py (accumulated loss per update step)"),
        TagMap("smooth_loss/train_step", vm.LOSS_SMOOTHED, "smoothed", "Nerogar/OneTrainer "
               "modules/trainer/GenericTrainer.py (EMA of the loss, decay 0.99)"),
        TagMap("loss/loss", vm.LOSS, "step", "Nerogar/OneTrainer "
               "modules/trainer/GenericTrainer.py before 2024-09 (the step's loss)"),
        TagMap("loss/smooth loss", vm.LOSS_SMOOTHED, "smoothed", "Nerogar/OneTrainer "
               "modules/trainer/GenericTrainer.py before 2024-09 (its EMA)"),
        TagMap("lr/*", LR_GROUP, "step", "Nerogar/OneTrainer "
               "modules/modelSetup/BaseModelSetup.py report_to_tensorboard"),
        TagMap("loss/validation_step/total_average", vm.VAL_LOSS, "step", "Nerogar/OneTrainer "
               "modules/trainer/GenericTrainer.py __validate (all validation concepts)"),
        TagMap("loss/validation_step/*", SET_PREFIX + GROUP + "/loss", "step", "Nerogar/"
               "OneTrainer modules/trainer/GenericTrainer.py __validate (one per concept)"),
    ), "finetune", """\
from ldmkit.vitals.observer import VitalsMonitor, normalize_timesteps
vitals = VitalsMonitor(self.config.workspace_dir + "/vitals")
# BaseStableDiffusionSetup.predict (epsilon): predicted_latent_noise, latent_noise, timestep,
# scaled_latent_image; hand them out with model_output_data, then in GenericTrainer.train:
vitals.observe_train_step(train_progress.global_step, loss, predicted_latent_noise,
                          latent_noise, normalize_timesteps(timestep, 1000), scaled_latent_image)""",
            settings=(("train.warmup_steps", "learning_rate_warmup_steps"),
                      ("warmup_steps", "learning_rate_warmup_steps"),
                      ("train.lr", "learning_rate"), ("grad_clip", "clip_grad_norm"),
                      ("data.val_fraction", "a validation concept")),
            validation="its validation concepts (concept type VALIDATION), at the timesteps of a "
                       "fixed seed; held out only if those images are not also a training concept"),
    Trainer("simpletuner", "SimpleTuner",
            _sig(("train_loss", "optimization_loss"), ("train_loss", "learning_rate", "epoch")), (
                TagMap("train_loss", vm.LOSS, "step", "bghira/SimpleTuner "
                       "simpletuner/helpers/training/trainer.py (wandb_logs, per update step)"),
                TagMap("learning_rate", vm.LEARNING_RATE, "step", "bghira/SimpleTuner "
                       "simpletuner/helpers/training/trainer.py"),
                TagMap("grad_norm", vm.GRAD_NORM, "step", "bghira/SimpleTuner "
                       "simpletuner/helpers/training/trainer.py _update_grad_metrics "
                       "(clip_grad_norm_'s pre-clipping norm)"),
                TagMap("loss/val/*", SET_PREFIX + GROUP + "/loss", "step", "bghira/SimpleTuner "
                       "simpletuner/helpers/training/validation.py generate_tracker_table (one "
                       "per eval dataset, and 'pooled')"),
            ), "finetune", ACCELERATE_HOOK.format(scale="vae.config.scaling_factor",
                                                  pred="model_pred"),
            settings=FLAGS[:-1] + (("data.val_fraction", "an eval dataset (dataset_type: "
                                                         "eval)"),),
            validation="its eval datasets (dataset_type: eval) over fixed timesteps"),
    Trainer("ai-toolkit", "ai-toolkit (its loss_log.db)", _sig(("loss/loss", "learning_rate")), (
        TagMap("loss/loss", vm.LOSS, "step", AITK + "jobs/process/BaseSDTrainProcess.py "
               "(self.logger.log({f'loss/{key}': value}) for loss_dict, then commit(step))"),
        TagMap("learning_rate", vm.LEARNING_RATE, "step", AITK + "jobs/process/"
               "BaseSDTrainProcess.py (self.logger.log({'learning_rate': ...}))"),
        TagMap("val/loss", vm.VAL_LOSS, "step", AITK + "jobs/process/BaseSDTrainProcess.py "
               "validate (additional_logs['val/loss'])"),
    ), "finetune", ACCELERATE_HOOK.format(scale="self.sd.vae.config.scaling_factor",
                                          pred="noise_pred")
        + "\n# extensions_built_in/sd_trainer/SDTrainer.py: in train_single_accumulation, with "
          "self.accelerator and self.sd.noise_scheduler (a flow model: pass sigmas=)",
        settings=WORDS[:-1] + (("data.val_fraction", "train.validation_config"),),
        validation="the validation images of train.validation_config (its UI: 'do not include "
                   "the validation images in the dataset'), at validation_sigmas with fixed "
                   "noise, averaged"),
    Trainer("diffusion-pipe", "diffusion-pipe",
            _sig(("train/epoch_loss",), ("train/loss", "eval/eval_time_sec")), (
                TagMap("train/loss", vm.LOSS, "step", PIPE + "(every logging_steps; the x axis "
                       "is examples seen when x_axis_examples is set)"),
                TagMap("train/grad_norm", vm.GRAD_NORM, "step", PIPE + "(optimizer._grad_norm)"),
                TagMap("train/epoch_loss", vm.LOSS_EPOCH, "epoch", PIPE + "(the epoch as the "
                       "step)"),
                TagMap("*/loss_quantile_*", SET_PREFIX + SET + QUANTILE + GROUP, "step",
                       PIPE + "_evaluate (per eval dataset, at 9 timestep quantiles)"),
                TagMap("*/loss", SET_PREFIX + SET + "/loss", "step", PIPE + "_evaluate (the "
                       "mean of the quantiles)"),
                TagMap("eval/eval_time_sec", "timing/eval_seconds", "step", PIPE + "_evaluate "
                       "(the evaluation's wall time)"),
            ), "finetune", FLOW_HOOK.format(directory="run_dir + '/vitals'",
                                            where="train.py, after the step's loss on rank 0 "
                                                  "(models/*.py give x_t, t and the output)"),
            settings=(("train.warmup_steps", "warmup_steps"), ("warmup_steps", "warmup_steps"),
                      ("train.lr", "[optimizer] lr"), ("grad_clip", "gradient_clipping"),
                      ("diffusion.latent_scale_factor", "the latent scale factor"),
                      ("data.val_fraction", "eval_datasets")),
            quantile_to_t=diffusion_pipe_t,
            validation="its eval_datasets (their own dataset configs: held out only if they "
                       "name other images than the training dataset) at 9 quantiles of the "
                       "training timestep distribution"),
    Trainer("ltx-trainer", "LTX-2 trainer (ltx-trainer)",
            _sig(("train/loss", "train/step_time", "train/global_step")), (
                TagMap("train/loss", vm.LOSS, "step", LTX + "trainer.py (the optimization "
                       "step's loss, to W&B)"),
                TagMap("train/learning_rate", vm.LEARNING_RATE, "step", LTX + "trainer.py"),
            ), "finetune", FLOW_HOOK.format(directory="output_dir + '/vitals'",
                                            where="trainer.py, where the step's output.loss "
                                                  "and output.sigma are computed"),
            settings=(("train.lr", "optimization.learning_rate"),
                      ("grad_clip", "optimization.max_grad_norm"),
                      ("train.warmup_steps", "the scheduler's warm-up"),
                      ("warmup_steps", "the scheduler's warm-up"),
                      ("diffusion.latent_scale_factor", "the latent scale factor"))),
    Trainer("open-sora", "Open-Sora", _sig(("global_grad_norm",)), (
        TagMap("loss", vm.LOSS, "step", SORA + "(TensorBoard and W&B: the update step's loss)"),
        TagMap("avg_loss", vm.LOSS_SMOOTHED, "smoothed", SORA + "(running_loss / log_step)"),
        TagMap("lr", vm.LEARNING_RATE, "step", SORA + "(param_groups[0]['lr'])"),
        TagMap("global_grad_norm", vm.GRAD_NORM, "step", SORA + "(optimizer.get_grad_norm())"),
    ), None, FLOW_HOOK.format(directory="cfg.outputs + '/vitals'",
                              where="scripts/diffusion/train.py, where the step's loss is "
                                    "computed"), settings=WORDS),
    Trainer("k-diffusion", "k-diffusion (W&B)", _sig(("loss", "lr", "epoch", "ema_decay")), (
        TagMap("loss", vm.LOSS, "step", "crowsonkb/k-diffusion train.py (wandb.log: the "
               "gathered loss of the step)"),
        TagMap("lr", vm.LEARNING_RATE, "step", "crowsonkb/k-diffusion train.py"),
    ), None, K_DIFFUSION_HOOK, settings=WORDS),
    Trainer("k-diffusion-csv", "k-diffusion (its *_metrics.csv)",
            _sig(("loss", "fid", "kid", "time")), (
                TagMap("loss", vm.LOSS_SMOOTHED, "smoothed", "crowsonkb/k-diffusion train.py "
                       "(metrics_log.write: ema_stats['loss'], an EMA, at each evaluation)"),
            ), None, K_DIFFUSION_HOOK, settings=WORDS),
    Trainer("diffusers-unconditional", "diffusers train_unconditional.py",
            _sig(("loss", "lr", "step")), (
                TagMap("loss", vm.LOSS, "step",
                       DIFFUSERS + "unconditional_image_generation/train_unconditional.py"),
                TagMap("lr", vm.LEARNING_RATE, "step",
                       DIFFUSERS + "unconditional_image_generation/train_unconditional.py"),
            ), None, ACCELERATE_HOOK.format(scale="None", pred="model_output")
            .replace("latents,", "clean_images,").replace("noisy_latents=noisy_latents",
                                                            "noisy_latents=noisy_images"),
            settings=FLAGS),
    Trainer("diffusers", "diffusers training examples (text-to-image, DreamBooth, LoRA)",
            _sig(("train_loss",), ("loss", "lr")), (
                TagMap("train_loss", vm.LOSS, "step", DIFFUSERS + "text_to_image/"
                       "train_text_to_image.py (the mean over accumulation and processes)"),
                TagMap("loss", vm.LOSS, "step", DIFFUSERS + "dreambooth/train_dreambooth.py"),
                TagMap("lr", vm.LEARNING_RATE, "step", DIFFUSERS + "dreambooth/"
                       "train_dreambooth.py"),
            ), None, ACCELERATE_HOOK.format(scale="vae.config.scaling_factor", pred="model_pred"),
            settings=FLAGS),
)

# the guide's own names, the CompVis latent-diffusion code's, and ldmkit's own tags
GENERIC = Trainer("generic", "a log with the guide's or ldmkit's tag names", (), tuple(
    TagMap(foreign, tag, "step", source) for foreign, tag, source in (
        ("loss", vm.LOSS, "the guide"), ("train/loss", vm.LOSS, "the guide"),
        ("grad_norm", vm.GRAD_NORM, "the guide"), ("train/grad_norm", vm.GRAD_NORM, "the guide"),
        ("learning_rate", vm.LEARNING_RATE, "the guide"),
        ("train/learning_rate", vm.LEARNING_RATE, "the guide"), ("t_mean", vm.T_MEAN, "the guide"),
        ("cos_eps_mean", vm.COS_EPS, "the guide"), ("z_std", vm.Z_STD, "the guide"),
        ("train_loss", vm.LOSS, "diffusers examples"), ("step_loss", vm.LOSS, "diffusers"),
        ("lr", vm.LEARNING_RATE, "diffusers examples"),
        ("train/loss_simple", vm.LOSS, "CompVis/latent-diffusion ldm/models/diffusion/ddpm.py"),
        ("train/loss_simple_step", vm.LOSS, "CompVis/latent-diffusion (Lightning's _step)"),
        ("lr_abs", vm.LEARNING_RATE, "CompVis/latent-diffusion ldm/models/diffusion/ddpm.py"))),
    None, ACCELERATE_HOOK.format(scale="vae.config.scaling_factor", pred="model_pred"),
    settings=WORDS)
LDMKIT = Trainer("ldmkit", "ldmkit", (), (), "pretrain", "")


def detect(tags: set[str]) -> Trainer:
    """The trainer whose signature tags are all logged (first match; a loop with ldmkit's hook
    logs its own tags too); else ldmkit's own log when it holds ldmkit's loss tag; else the
    generic map."""
    for trainer in TRAINERS:
        if any(signature <= tags for signature in trainer.signatures):
            return trainer
    return LDMKIT if vm.LOSS in tags else GENERIC


def _match(pattern: str, tag: str) -> dict[str, str] | None:
    """What ``pattern``'s leading and trailing '*' matched in ``tag`` (each at least one
    character; a '*' inside, as kohya's ``lr/d*lr/``, is literal), or None."""
    lead, trail = pattern.startswith("*"), pattern.endswith("*") and len(pattern) > 1
    middle = pattern[lead:len(pattern) - trail]
    regex = ("(?P<set>.+?)" if lead else "") + re.escape(middle) + ("(?P<group>.+)" if trail else "")
    match = re.fullmatch(regex, tag)
    return None if match is None else {k: v for k, v in match.groupdict().items() if v}


@dataclass
class Mapped:
    """Records renamed to our tags, and for each of our tags the foreign tags it was read from."""

    records: list[tuple[int, str, float]]
    read_from: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # how the run's validation loss was chosen


def map_tags(trainer: Trainer, records: list[tuple[int, str, float]],
             config: dict[str, Any] | None = None) -> Mapped:
    """Rename ``records`` by the trainer's rows, then the guide's generic names; a tag that no
    row maps keeps its name, and a canonical tag when logged wins over what would map onto it.
    Per-group learning rates and per-set validation losses then give the run's one rate and
    one validation loss (``validation_sets``), read with the run's ``config``."""
    logged = {tag for _, tag, _ in records}
    names: dict[str, str] = {}
    for tag in logged:
        names[tag] = tag
        for row in trainer.tags + GENERIC.tags:
            found = _match(row.foreign, tag)
            if found is not None:
                names[tag] = row.tag.replace(GROUP, found.get("group", "")) \
                    .replace(SET, found.get("set", ""))
                break
    names = {t: ours for t, ours in names.items() if ours == t or ours not in logged}
    mapped = Mapped([(step, names[tag], value) for step, tag, value in records if tag in names])
    for tag, ours in names.items():
        mapped.read_from.setdefault(ours, []).append(tag)
    _main_learning_rate(trainer, mapped)
    mapped.notes += main_validation(mapped.records, mapped.read_from, config or {},
                                    trainer.quantile_to_t)
    if vm.VAL_LOSS in mapped.read_from and vm.VAL_TRAIN_LOSS not in mapped.read_from:
        mapped.records += training_side(mapped.records)
        if trainer.validation:
            mapped.notes.append(f"validation loss: {trainer.validation}")
    return mapped


def _main_learning_rate(trainer: Trainer, mapped: Mapped) -> None:
    """Per-group rates only: the backbone's group (unet, transformer, ...) is the run's rate."""
    if vm.LEARNING_RATE in mapped.read_from:
        return
    prefix = vm.LEARNING_RATE + "/"
    for group in trainer.main_lr_groups:
        if prefix + group in mapped.read_from:
            mapped.records += [(s, vm.LEARNING_RATE, v) for s, t, v in mapped.records
                               if t == prefix + group]
            mapped.read_from[vm.LEARNING_RATE] = mapped.read_from[prefix + group]
            return


def kind_of(trainer: Trainer, tag: str) -> Kind:
    for row in trainer.tags:
        if row.tag == tag:
            return row.kind
    return "step"
