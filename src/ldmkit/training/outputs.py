"""What a training step makes besides an update: samples and their vitals, and ``eval/*``.

Both are made with the EMA weights and can be cut short by a stop request (SIGTERM, SIGINT),
which must not wait for a whole sampling; what was cut short is owed, recorded in the
checkpoint that follows and made first on resume, so a stop loses no record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ldmkit.conditioning.sources import ConditionSource
from ldmkit.config import Config
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.platform.preemption import Preempted
from ldmkit.run.layout import RunDir
from ldmkit.sampling.evaluate import InLoopEval
from ldmkit.sampling.generate import generate, guided_tags, save_samples
from ldmkit.training.optim import EMA
from ldmkit.training.runtime import Runtime
from ldmkit.training.state import EVAL, SAMPLE, LoopState
from ldmkit.vitals import metrics as vm


def sample_and_log(cfg: Config, step: int, ema: EMA, ae: Autoencoder, scale: float, rt: Runtime,
                   out: Path, num: int, singles: bool,
                   reference: Callable[[], vm.CopyReference | None] | None,
                   source: ConditionSource) -> tuple[Path | None, dict]:
    """Sample the ``source``'s default request (every class, or the run's prompts, in turn)
    with the EMA weights, log the sample vitals (with how near the samples are to the
    training images ``reference()`` renders), save the grid. A conditional model with
    ``sample.guidance_scale`` != 1 is sampled twice: unguided for the vital signs, which the
    guide's bands judge, and guided for the grid, whose vitals are logged as ``TAG@cfgG``.
    A stop request (SIGTERM/SIGINT) ends the sampling at its next step with ``Preempted``."""
    s, request = cfg.sample, source.request(num)
    samples = generate(ema.model, ae, scale, cfg, num, s.sampler, s.steps, s.seed, s.eta, d=rt.d,
                       interrupt=rt.stop_requested, request=request, guidance=1.0)
    copies = reference() if reference is not None and rt.d.is_main else None
    if copies is not None:
        samples.vitals.update(vm.copy_vitals(samples.images, copies))
    vitals, logged = samples.vitals, dict(samples.vitals)
    if source.kind != "none" and s.guidance_scale != 1.0:
        samples = generate(ema.model, ae, scale, cfg, num, s.sampler, s.steps, s.seed, s.eta,
                           d=rt.d, interrupt=rt.stop_requested, request=request)
        logged |= guided_tags(samples.vitals, s.guidance_scale)
    rt.logger.log(step, logged)  # once all is sampled: an interrupted sampling logs nothing
    grid = save_samples(samples, out, singles, request.columns) if rt.d.is_main else None
    return grid, vitals


@dataclass
class StepOutputs:
    """What some steps make besides an update: samples (``train.sample_every``) and the
    ``eval/*`` metrics (``train.eval_every``). A stop request cuts them short; the checkpoint
    that follows names them (``LoopState.pending``) and the resumed run makes them first, so a
    stop loses no record."""

    cfg: Config
    ae: Autoencoder
    scale: float
    rt: Runtime
    run_dir: Path
    reference: Callable[[], vm.CopyReference | None]
    evaluator: InLoopEval | None
    source: ConditionSource

    def due(self, step: int) -> list[str]:
        tc = self.cfg.train
        return ([SAMPLE] if step % tc.sample_every == 0 and step < tc.steps else []) + \
            ([EVAL] if self.evaluator is not None
             and (step % tc.eval_every == 0 or step == tc.steps) else [])

    def make(self, state: LoopState, which: list[str]) -> list[str]:
        """Make ``which`` at ``state.step``; returns those a stop request cut short."""
        cut, rt, step = [], self.rt, state.step
        for kind in which:
            try:
                if kind == SAMPLE:
                    sample_and_log(self.cfg, step, state.ema, self.ae, self.scale, rt,
                                   RunDir(self.run_dir).samples(step),
                                   self.cfg.sample.during_training_num, False, self.reference,
                                   self.source)
                elif self.evaluator is not None:
                    rt.logger.log(step, self.evaluator.measure(
                        state.ema.model, self.ae, self.scale, self.cfg, rt.d, rt.stop_requested,
                        self.source))
            except Preempted:  # the checkpoint comes next, and names what is left
                cut.append(kind)
        return cut
