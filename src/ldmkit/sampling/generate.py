"""Generate images from a trained run: sample latents, measure them, decode, save PNGs.

The same ``generate`` serves sampling during training (fixed seed, so grids are comparable across
steps) and ``ldmkit sample``. The sample vitals are measured on the latents handed to the decoder,
i.e. after dividing by the scale (guide: final_latent_stats). A conditional model samples the
conditions its source is asked for (conditioning/sources.py: by default every class, or the
run's prompts, in turn) with classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldmkit.conditioning.sources import (
    ClassSource,
    ConditionSource,
    Request,
    TextSource,
    requested_labels,
    source_of_model,
)
from ldmkit.config import Config, SampleConfig, check_flag, from_dict
from ldmkit.data.sources import to_uint8
from ldmkit.diffusion import condition
from ldmkit.diffusion.condition import LABELS
from ldmkit.diffusion.parameterization import Parameterization, parameterization_of
from ldmkit.diffusion.samplers import run_sampler
from ldmkit.errors import LdmkitError
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.platform.distributed import SINGLE, Dist, all_gather_cat, shard, shard_size
from ldmkit.platform.fastpath import EAGER_FP32, Compiled, FastPath, choose
from ldmkit.platform.files import check_output, write_text_atomic
from ldmkit.platform.images import image_grid, save_png, to_pil
from ldmkit.platform.preemption import Preempted, StopRequest
from ldmkit.run.layout import RunDir, writing_run
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Finding, event_finding
from ldmkit.vitals.logs.metrics_jsonl import MetricLogger
from ldmkit.vitals.metrics import guidance_tag, sample_vitals
from ldmkit.vitals.monitor import LiveMonitor


@dataclass
class Samples:
    latents: torch.Tensor  # [N, C, h, w] decoder space (divided by the scale)
    images: torch.Tensor  # [N, C, H, W] uint8
    vitals: dict[str, float]
    request: Request  # the condition each sample was asked for

    @property
    def labels(self) -> torch.Tensor | None:
        """``[N]`` the class each sample was asked for (None: not class-conditional)."""
        return self.request.cond.get(LABELS)


def parameterization(cfg: Config) -> Parameterization:
    return parameterization_of(cfg.diffusion)


def start_noise(num: int, shape: tuple[int, ...], seed: int
                ) -> tuple[torch.Tensor, torch.Generator]:
    """``num`` draws of ``N(0, I)`` of ``shape`` from ``seed``, and the generator after them
    (which an ancestral sampler goes on drawing from)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((num, *shape), generator=gen), gen


@torch.no_grad()
def decode_images(ae: Autoencoder, latents: torch.Tensor, batch_size: int = 256,
                  fast: FastPath = EAGER_FP32) -> torch.Tensor:
    """Decoder-space latents ``[N, C, h, w]`` -> uint8 images ``[N, C, H, W]``, in batches."""
    with fast.autocast():
        return torch.cat([to_uint8(ae.decode(z)) for z in latents.split(batch_size)])


def sampling_path(cfg: Config, device: torch.device, num: int, steps: int) -> FastPath:
    """The fast path of sampling ``num`` samples in ``steps`` steps with the config's
    ``train.precision`` and ``train.compile`` (fastpath.py): the sampler's denoiser and the
    decoder run in bf16 where the device has it, compiled only for very large jobs."""
    return choose(cfg.train.precision, cfg.train.compile, device, "sample", num * steps)


def autocast_net(net: nn.Module | Compiled, fast: FastPath) -> Callable[..., torch.Tensor]:
    """``net`` run under the fast path's autocast; the samplers integrate its output in fp32
    (``Parameterization.predict``)."""

    def forward(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        with fast.autocast():
            return net(x, t, **cond)

    return forward


@torch.no_grad()
def generate(model: nn.Module, ae: Autoencoder, scale: float, cfg: Config, num: int,
             sampler: str, steps: int, seed: int, eta: float = 0.0,
             batch_size: int = 256, d: Dist = SINGLE,
             interrupt: Callable[[], bool] | None = None, request: Request | None = None,
             guidance: float | None = None, fast: FastPath | None = None) -> Samples:
    """Sample ``num`` latents in batches from ``N(0, I)`` drawn with ``seed``, then decode.

    A conditional model samples the conditions of ``request`` (one per sample; default: its
    source's, every class in turn) with classifier-free guidance ``guidance`` (default
    ``sample.guidance_scale``) within ``sample.guidance_interval``. Under DDP each rank
    samples its shard of the same noise and the latents are gathered, so the sample vitals are
    those of all ``num`` samples; rank 0 alone decodes (others get no images). ``interrupt``
    is asked at every sampler step; when it says yes, sampling ends with ``Preempted`` (a
    SIGTERM must not wait for a whole sampling).
    ``fast``: bf16 and compilation (default: ``sampling_path`` of the config on this device).
    """
    device = next(model.parameters()).device
    request = request or source_of_model(model).request(num)
    num = len(request) or num
    fast = fast or sampling_path(cfg, device, num, steps)
    shape = (ae.latent_channels, cfg.data.image_size // ae.downsample_factor,
             cfg.data.image_size // ae.downsample_factor)
    shard_size(num, d, "the number of samples")
    noise, gen = start_noise(num, shape, seed)
    noise = shard(noise, d)
    if d.active:  # ancestral noise must differ between shards
        gen = torch.Generator().manual_seed(seed * 1_000_003 + d.rank + 1)
    mine = {key: shard(value, d).to(device) for key, value in request.cond.items()}
    parts_cond = [condition.rows(mine, slice(i, i + batch_size))
                  for i in range(0, len(noise), batch_size)]
    param = parameterization(cfg)
    guidance = cfg.sample.guidance_scale if guidance is None else guidance
    interval = tuple(cfg.sample.guidance_interval)
    was_training = model.training
    model.eval()

    def check(i: int, *_: torch.Tensor) -> None:
        if interrupt is not None and interrupt():
            raise Preempted("sampling", i, "stop")

    net = autocast_net(Compiled(model, fast, what="the sampler's denoiser"), fast)
    try:
        parts = [run_sampler(sampler, param.denoiser(net, cond, guidance, interval),
                             chunk.to(device), param.schedule, steps, eta, gen, check)
                 for chunk, cond in zip(noise.split(batch_size), parts_cond, strict=True)]
    finally:
        model.train(was_training)
    latents = all_gather_cat(torch.cat(parts).float(), d).cpu() / scale
    images = (decode_images(ae, latents, batch_size, fast) if d.is_main
              else torch.empty(0, dtype=torch.uint8))
    return Samples(latents, images, sample_vitals(latents, request.groups, request.by), request)


def save_samples(samples: Samples, out_dir: Path, singles: bool = True,
                 columns: int | None = None) -> Path:
    """Write ``grid.png`` (and ``000000.png``... for each sample) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_path = out_dir / "grid.png"
    save_png(image_grid(samples.images, columns=columns), grid_path)
    if singles:
        for i, img in enumerate(samples.images):
            save_png(to_pil(img), out_dir / f"{i:06d}.png")
    return grid_path


def sampling_request(source: ConditionSource, num: int, choice: str | None = None,
                     prompts: list[str] | None = None) -> Request:
    """What ``ldmkit sample`` asks for: ``--class`` of a class-conditional model, ``--prompt``
    of a text-conditional one (``num`` samples each), else the source's default; a one-line
    error for a flag the model cannot take."""
    if prompts and source.kind != "text":
        instead = "class-conditional: use --class" if source.kind == "class" \
            else "unconditional: drop --prompt"
        raise LdmkitError("--prompt needs a text-conditional model (model.text_encoder); this "
                          f"run's model is {instead}")
    if isinstance(source, ClassSource):
        return source.request(num, choice)
    if choice is not None:
        requested_labels(choice, num, None)  # refuses --class: not class-conditional
    if isinstance(source, TextSource):
        return source.request(num, prompts, num if prompts else None)
    return source.request(num)


def guidance_finding(cfg: Config, conditional: bool, guidance: float, step: int
                     ) -> Finding | None:
    """``cfg_without_uncond``: guidance extrapolates from the unconditional prediction, which a
    model trained with ``cond_drop_prob`` 0 never learned."""
    if not conditional or guidance == 1.0 or cfg.train.cond_drop_prob > 0:
        return None
    return event_finding("cfg_without_uncond", step, guidance)


def sample_run(run_dir: str | Path, num: int, sampler: str, steps: int, seed: int,
               eta: float = 0.0, out_dir: str | Path | None = None, choice: str | None = None,
               guidance: float | None = None, prompts: list[str] | None = None
               ) -> tuple[Path, Samples]:
    """``ldmkit sample``: EMA weights of the last checkpoint -> PNGs and logged sample vitals;
    ``choice``, ``prompts`` and ``guidance``: ``--class`` of a class-conditional model,
    ``--prompt`` of a text-conditional one (``num`` samples each, a grid row per prompt), and
    ``--guidance`` of either."""
    from ldmkit.run.context import context_of
    from ldmkit.sampling.trained import load_for_sampling

    run_dir = Path(run_dir)
    num, steps, seed, eta = check_sampling(num, steps, seed, eta)
    if guidance is not None:
        guidance = check_flag(SampleConfig, "guidance_scale", guidance, "--guidance")
    if out_dir is not None:
        check_output(Path(out_dir), "--out", directory=True)
    with writing_run(run_dir), StopRequest() as stop:
        cfg_dict, step, model, ae, scale, _ = load_for_sampling(run_dir)
        cfg = from_dict(cfg_dict)
        source = run_source(run_dir, model)
        conditional = source.kind != "none"
        if guidance is not None and not conditional:
            raise LdmkitError(f"--guidance needs a conditional model (model.num_classes or "
                              f"model.text_encoder); the model of '{run_dir}' is unconditional: "
                              "drop --guidance")
        request = sampling_request(source, num, choice, prompts)
        guidance = cfg.sample.guidance_scale if guidance is None else guidance
        warning = guidance_finding(cfg, conditional, guidance, step)
        if warning is not None:
            LiveMonitor(run_dir, context_of(cfg, scale, prompts=RunDir(run_dir).prompts()
                                            )).record(warning, step)
        samples = generate(model, ae, scale, cfg, num, sampler, steps, seed, eta,
                           interrupt=lambda: stop.requested, request=request, guidance=guidance)
        which = "" if choice is None else f"-class{choice}"
        which += "" if not prompts else f"-{len(prompts)}prompts"
        which += "" if not conditional or guidance == 1.0 else f"-cfg{guidance:g}"
        out = Path(out_dir) if out_dir else \
            RunDir(run_dir).samples_root / f"{sampler}{steps}-seed{seed}-n{num}{which}"
        grid = save_samples(samples, out, columns=request.columns)
        if prompts:
            write_text_atomic(out / "prompts.txt", "".join(p + "\n" for p in prompts))
        with MetricLogger(run_dir, tensorboard=cfg.tensorboard) as logger:
            logger.log(step, guided_tags(samples.vitals, guidance if conditional else 1.0))
    return grid, samples


def run_source(run_dir: Path, model: nn.Module) -> ConditionSource:
    """A trained run's condition source: by its model's keys, with its class names and the
    prompts of its grids."""
    num_classes = getattr(model, "num_classes", None)
    return source_of_model(model, RunDir(run_dir).classes(num_classes) if num_classes else None,
                           RunDir(run_dir).prompts())


def check_sampling(num: int, steps: int | None, seed: int, eta: float = 0.0
                   ) -> tuple[int, int | None, int, float]:
    """A command's ``--num``, ``--steps``, ``--seed`` and ``--eta``, bounded as the config's
    ``sample.*`` keys are (a one-line ConfigError naming the flag)."""
    return (check_flag(SampleConfig, "num", num, "--num"),
            None if steps is None else check_flag(SampleConfig, "steps", steps, "--steps"),
            check_flag(SampleConfig, "seed", seed, "--seed"),
            check_flag(SampleConfig, "eta", eta, "--eta"))


def guided_tags(vitals: dict[str, float], guidance: float) -> dict[str, float]:
    """Sample vitals of guided sampling under their own tags (``TAG@cfgG``), so that the
    guide's bands, which hold for the model itself, judge the unguided ones only."""
    if guidance == 1.0:
        return vitals
    return {**{guidance_tag(tag, guidance): v for tag, v in vitals.items()},
            vm.GUIDANCE_SCALE: guidance}
