"""ldmkit's own runs for the vital signs: what a config tells the rules, and a run's log.

``ldmkit.vitals`` knows nothing of ldmkit's config or optimizer (other people's training loops
import it); this module turns a config into the rules' ``Context`` (thresholds, the objective's
loss units, the learning-rate schedule) and reads a run directory's log with its config.
"""

from __future__ import annotations

from pathlib import Path

from ldmkit.config import Config, load_config
from ldmkit.config.schedule import lr_at
from ldmkit.config.untrusted import brief
from ldmkit.diffusion.parameterization import parameterization_of
from ldmkit.diffusion.registry import OBJECTIVES
from ldmkit.errors import ConfigError, LdmkitError
from ldmkit.run.layout import RunDir
from ldmkit.vitals.context import Context
from ldmkit.vitals.logs.readers import LoadedLog, read_log
from ldmkit.vitals.offline import Diagnosis, diagnose_loaded, with_objective
from ldmkit.vitals.rules import THRESHOLDS


def check_thresholds(config: Config) -> None:
    """``vitals.thresholds`` may name only the rules' thresholds (checked here, not in the config
    package, which knows nothing of the rules)."""
    unknown = sorted(set(config.vitals.thresholds) - set(THRESHOLDS))
    if unknown:
        raise ConfigError(f"unknown threshold 'vitals.thresholds.{brief(unknown[0])[1:-1]}'; "
                          f"allowed: {', '.join(THRESHOLDS)}")


def context_of(config: Config | None, latent_scale_factor: float | None,
               thresholds: dict[str, float] | None = None, prompts: list[str] | None = None
               ) -> Context:
    """The guide's thresholds overridden by ``config.vitals.thresholds``, then ``thresholds``;
    the objective's loss units and the configured learning-rate schedule; ``prompts``: a
    text-conditional run's grid prompts, which findings name."""
    if config is None:
        return Context.of(latent_scale_factor, thresholds, prompts=tuple(prompts or ()))
    check_thresholds(config)
    param = parameterization_of(config.diffusion)
    train = config.train
    return Context.of(latent_scale_factor, {**config.vitals.thresholds, **(thresholds or {})},
                      lr_schedule=lambda step: lr_at(step, train), lr=train.lr,
                      loss_scale=param.untrained_loss(),
                      val_loss_scale=param.untrained_loss(weighted=False),
                      prompts=tuple(prompts or ()))


def run_config(run_dir: Path) -> Config | None:
    """A run directory's saved config, or None when it has none or it does not load."""
    path = RunDir(run_dir).config
    if not path.is_file():
        return None
    try:
        return load_config(path, saved=True)
    except LdmkitError:
        return None


def run_prompts(run_dir: Path) -> list[str] | None:
    """A run's grid prompts; a damaged file names none (diagnosis goes on without them)."""
    try:
        return RunDir(run_dir).prompts()
    except LdmkitError:
        return None


def run_context(run_dir: Path) -> Context:
    """The context of a run directory's saved config (the guide's defaults without one)."""
    config = run_config(run_dir)
    return context_of(config, config.diffusion.latent_scale_factor if config else None,
                      prompts=run_prompts(run_dir))


PROBE_THRESHOLDS = {"min_steps": 0.0}  # a probe's checkpoints are trained, however numbered


def probe_context(settings: dict, latent_scale_factor: float | None,
                  thresholds: dict[str, float] | None, prompts: list[str] | None) -> Context:
    """A probe's context (``ldmkit probe``): trained checkpoints (the fine-tuning regime, no
    wait for ``min_steps``), the pipeline's objective for the loss units, one record judged
    (its signs are measured on fixed points)."""
    objective = settings.get("objective")
    ctx = Context.of(latent_scale_factor, {**PROBE_THRESHOLDS, **(thresholds or {})},
                     regime="finetune", prompts=tuple(prompts or ()), fixed_points=True)
    return with_objective(ctx, objective if objective in OBJECTIVES else None)


def read_run(path: str | Path, latent_scale_factor: float | None = None,
             require_values: bool = True, thresholds: dict[str, float] | None = None
             ) -> tuple[LoadedLog, Context]:
    """A log (``vitals.readers.read_log``) and its context: from the run's config when ``path``
    is a run directory, else the guide's defaults."""
    config = run_config(Path(path)) if Path(path).is_dir() else None
    if latent_scale_factor is None and config is not None:
        latent_scale_factor = config.diffusion.latent_scale_factor
    log = read_log(path, latent_scale_factor, require_values)
    prompts = run_prompts(Path(path)) if Path(path).is_dir() else None
    probe = RunDir(path).probe_settings() if Path(path).is_dir() else None
    ctx = (probe_context(probe, log.latent_scale_factor, thresholds, prompts) if probe
           else context_of(config, log.latent_scale_factor, thresholds, prompts))
    return log, ctx.learn(log.series)


def diagnose_path(path: str | Path, latent_scale_factor: float | None = None,
                  thresholds: dict[str, float] | None = None, objective: str | None = None,
                  mode: str | None = None) -> Diagnosis:
    """``ldmkit diagnose PATH``: an ldmkit run judged with its config, or any other trainer's
    log (``vitals.formats``); ``objective`` says what the loss is (flow's starts at 2) and
    ``mode`` (pretrain, finetune) overrides the regime read from the run."""
    log, ctx = read_run(path, latent_scale_factor, thresholds=thresholds)
    return diagnose_loaded(log, ctx, objective, mode)
