"""Training throughput against diffusers' UNet2DModel, FLOPs, and the cost of the vital signs.

Run: ``.venv/bin/python benchmarks/throughput.py`` (needs the ``bench`` extra: diffusers).
Both UNets train on the demo's latent shape and batch, with the same AdamW step; timings
alternate between the two in one process, and the figures are medians.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

from ldmkit.config import Config, load_config  # noqa: E402
from ldmkit.diffusion.parameterization import Parameterization  # noqa: E402
from ldmkit.diffusion.schedule import sample_t  # noqa: E402
from ldmkit.models.registry import backbone_spec, build_backbone  # noqa: E402
from ldmkit.platform.fastpath import Compiled, FastPath, choose  # noqa: E402
from ldmkit.training.loop import train_step  # noqa: E402
from ldmkit.training.runtime import attach_monitor  # noqa: E402
from ldmkit.vitals import metrics as vm  # noqa: E402
from ldmkit.vitals.logs.metrics_jsonl import MetricLogger  # noqa: E402
from ldmkit.vitals.signs import StepAccumulator

ROOT = Path(__file__).resolve().parents[1]
CFG = load_config(ROOT / "configs/digits.yaml")
BATCH, SHAPE, STEPS, ROUNDS = CFG.train.batch_size, (4, 8, 8), 10, 5


def diffusers_unet() -> UNet2DModel:
    """UNet2DModel sized to ldmkit's demo UNet (parameter counts within 10 %)."""
    return UNet2DModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                       block_out_channels=(32, 64), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def step_fn(model: torch.nn.Module, discrete: bool, forward=None, batch: int = BATCH,
            shape: tuple[int, ...] = SHAPE):
    """One training step (forward, backward, AdamW) of ``model`` on a fixed batch of ``batch``
    latents of ``shape``; ``discrete``: a diffusers model taking steps 0..999;
    ``forward(x, t)``: how to call it, if otherwise."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    z, eps = torch.randn(batch, *shape, generator=gen), torch.randn(batch, *shape, generator=gen)
    t = torch.rand(batch, generator=gen)
    param = Parameterization()

    def net(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        if forward is not None:
            return forward(x, tt)
        return model(x, (tt * 999).long()).sample if discrete else model(x, tt)

    def step() -> None:
        loss = param.loss(net, z, t, eps).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def path_step(cfg: Config, work: int) -> tuple[Callable[[], None], FastPath]:
    """The bare step (``step_fn``) of ``cfg``'s backbone on the fast path that its training of
    ``work`` steps chooses (``train.precision`` / ``train.compile``), and that path."""
    fast = choose(cfg.train.precision, cfg.train.compile, torch.device("cpu"), "train", work)
    model = build_backbone(backbone_spec(cfg.model, 4, 8))
    net = Compiled(model, fast)

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with fast.autocast():
            return net(x, t)

    return step_fn(model, False, forward), fast


def heaviest(call: Callable[[], None], calls: int = 3, rows: int = 12) -> str:
    """torch profiler's heaviest operators by self CPU time over ``calls`` calls (one before,
    unprofiled), as a table."""
    call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def seconds_per_step(step, steps: int = STEPS) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_peak(dtype: torch.dtype = torch.float32) -> float:
    """This machine's matmul throughput at ``dtype`` in GFLOP/s (median of 5, 2048^2)."""
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def side_by_side(steps: dict, models: dict, peak: float) -> tuple[list[str], dict[str, float]]:
    """Table rows and median seconds per step of each named step, alternated over rounds."""
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(ROUNDS):  # alternate, so machine noise hits both
        for name, step in steps.items():
            times[name].append(seconds_per_step(step))
    rows, seconds = [], {name: statistics.median(v) for name, v in times.items()}
    for name, step in steps.items():
        sec, f = seconds[name], flops(step)
        rows.append(f"| {name} | {params(models[name]) / 1e6:.2f} M | {BATCH / sec:.0f} | "
                    f"{sec * 1e3:.0f} ms | {f / 1e9:.1f} | {f / sec / 1e9:.1f} "
                    f"({f / sec / 1e9 / peak:.0%}) |")
    return rows, seconds


def throughput_section() -> str:
    ours, theirs = build_backbone(backbone_spec(CFG.model, 4, 8)), diffusers_unet()
    models = {"ldmkit UNet": ours, "diffusers UNet2DModel": theirs}
    steps = {"ldmkit UNet": step_fn(ours, False), "diffusers UNet2DModel": step_fn(theirs, True)}
    peak = matmul_peak()
    rows, seconds = side_by_side(steps, models, peak)
    ratio = seconds["diffusers UNet2DModel"] / seconds["ldmkit UNet"]
    return f"""## Training throughput vs diffusers (`benchmarks/throughput.py`)

Machine: {machine()}; fp32 matmul peak measured here: {peak:.0f} GFLOP/s (2048^2, median of 5).
One training step (forward, backward, AdamW) on latents {BATCH}x{"x".join(map(str, SHAPE))}
(the demo's), median of {ROUNDS} rounds of {STEPS} steps, alternating the two models.

| model | parameters | latents/s | step | GFLOP per step | achieved GFLOP/s (of peak) |
|---|---|---|---|---|---|
{chr(10).join(rows)}

ldmkit's UNet trains {ratio:.2f}x as fast as diffusers' UNet2DModel of about the same size
(parameters within 10 %), doing the same work per step; both reach about half the matmul peak.
"""


def dit_section() -> str:
    """configs/digits-dit.yaml's DiT against diffusers' DiTTransformer2DModel holding the same
    weights (models/diffusers_export.py), and the demo's UNet."""
    from ldmkit.models.diffusers_export import dit_to_diffusers

    spec = backbone_spec(load_config(ROOT / "configs/digits-dit.yaml").model, 4, 8)
    ours = build_backbone(spec)
    theirs = dit_to_diffusers(ours, **spec["args"])
    labels = torch.zeros(BATCH, dtype=torch.long)
    unet = build_backbone(backbone_spec(CFG.model, 4, 8))
    models = {"ldmkit DiT": ours, "diffusers DiTTransformer2DModel": theirs, "ldmkit UNet": unet}
    steps = {"ldmkit DiT": step_fn(ours, False),
             "diffusers DiTTransformer2DModel": step_fn(theirs, True, lambda x, tt: theirs(
                 x, tt * 999, class_labels=labels).sample),
             "ldmkit UNet": step_fn(unet, False)}
    peak = matmul_peak()
    rows, seconds = side_by_side(steps, models, peak)
    a = spec["args"]
    tokens = (8 // a["patch_size"]) ** 2
    return f"""## DiT vs diffusers' DiT (`benchmarks/throughput.py dit`)

Machine: {machine()}; fp32 matmul peak measured here: {peak:.0f} GFLOP/s.
One training step (forward, backward, AdamW) on latents {BATCH}x{"x".join(map(str, SHAPE))},
median of {ROUNDS} rounds of {STEPS} steps, alternating the models. The DiT is
`configs/digits-dit.yaml`'s (patch {a["patch_size"]}, width {a["hidden_size"]}, depth {a["depth"]},
{a["num_heads"]} heads: {tokens} tokens). diffusers' `DiTTransformer2DModel` holds the same
weights (`ldmkit export`'s conversion, outputs equal to 1e-5), called with class 0 as an
exported unconditional DiT is; it has more parameters only because it keeps a copy of the
time MLP in every block.

| model | parameters | latents/s | step | GFLOP per step | achieved GFLOP/s (of peak) |
|---|---|---|---|---|---|
{chr(10).join(rows)}

ldmkit's DiT trains {seconds["diffusers DiTTransformer2DModel"] / seconds["ldmkit DiT"]:.2f}x as
fast as diffusers' DiT with the same weights; its step takes
{seconds["ldmkit DiT"] / seconds["ldmkit UNet"]:.2f}x the demo UNet's.
"""


def overhead_section() -> str:
    """Step time with every vital sign and the live diagnosis vs a bare step."""
    model = build_backbone(backbone_spec(CFG.model, 4, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    params_list, param = list(model.parameters()), Parameterization()
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(BATCH, *SHAPE, generator=gen)

    def batch():
        return sample_t(BATCH, "uniform", gen), torch.randn(z.shape, generator=gen)

    def bare() -> None:
        t, eps = batch()
        loss = param.loss(model, z, t, eps).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_list, 1.0)
        opt.step()

    with tempfile.TemporaryDirectory() as tmp, MetricLogger(tmp, tensorboard=True) as logger:
        attach_monitor(CFG, Path(tmp), logger, 1.0, 0)
        acc, counter = StepAccumulator(), [0]
        scratch = [torch.empty_like(p) for p in params_list]
        every = vm.update_ratio_every(CFG.train.log_every)

        def full_step(with_ratio: bool):
            def step() -> None:
                t, eps = batch()
                measure = with_ratio and counter[0] % every == 0
                _, vitals = train_step(model, params_list, opt, param, z, t, eps, 1.0,
                                       scratch=scratch if measure else None)
                acc.add(vitals)
                counter[0] += 1
                if counter[0] % CFG.train.log_every == 0:
                    logger.log(counter[0], {**acc.read(), vm.LEARNING_RATE: 1e-4})
            return step

        variants = {"bare": bare, "no_ratio": full_step(False), "full": full_step(True)}
        for step in variants.values():
            step()
        runs: dict[str, list[float]] = {name: [] for name in variants}
        steps = CFG.train.log_every  # a whole log interval, so logging and rules are included
        for _ in range(ROUNDS):
            for name, step in variants.items():
                runs[name].append(seconds_per_step(step, steps))
    b, n, f = (statistics.median(runs[k]) for k in ("bare", "no_ratio", "full"))
    verdict = "met" if f / b - 1 <= 0.02 else "missed"
    measured = ratio_seconds(params_list, scratch)
    share = measured / every / b
    ratio_verdict = "met" if share <= 0.005 else "missed"
    return f"""## Vital-sign overhead (`benchmarks/throughput.py overhead`)

Machine: {machine()}. Demo UNet, batch {BATCH}, {steps}-step intervals (one log interval each,
so metrics.jsonl + TensorBoard writes and the rule evaluation are included), median of
{ROUNDS}, the three variants alternating. Bare step: loss, backward, clipping, AdamW. Full
step: ldmkit's `train_step` (grad norm before clipping, non-finite guard,
loss/t_mean/cos_eps/z_std kept on the device, and `optimization/update_ratio`: a copy of the
weights before the update and two norms, on every {every}th step as in training), the
accumulator, and at the interval's end the log write and the live diagnosis. "No ratio" is the
full step without the update ratio.

| bare | no ratio | full | all vitals vs bare (<= 2 %) | full vs no ratio |
|---|---|---|---|---|
| {b * 1e3:.1f} ms | {n * 1e3:.1f} ms | {f * 1e3:.1f} ms | {f / b - 1:+.1%} ({verdict}) | \
{f / n - 1:+.2%} |

Step-to-step noise here is about 2 %, more than the update ratio costs, so its cost is also
timed alone: copying the weights and the two norms take {measured * 1e3:.2f} ms (median of 50),
paid on every {every}th step: {share:.2%} of a bare step (target <= 0.5 %: {ratio_verdict}).
"""


def validation_section() -> str:
    """The deterministic validation, a sampling's copy check and in-loop eval vs training time."""
    from ldmkit.data.stage1 import LatentPosteriors, build_autoencoder
    from ldmkit.sampling.evaluate import InLoopEval
    from ldmkit.training import held_out as validation
    from ldmkit.training.optim import EMA

    model = build_backbone(backbone_spec(CFG.model, 4, 8))
    ema, ae = EMA(model, 0.999), build_autoencoder(CFG.autoencoder, 1).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    param, gen = Parameterization(), torch.Generator().manual_seed(0)
    n = 1797  # the digits demo
    latents = LatentPosteriors(torch.randn(n, *SHAPE, generator=gen), torch.zeros(n, *SHAPE))
    parts = validation.split(n, CFG)
    vset = validation.draw(CFG, parts, latents, ae)
    reference = vm.CopyReference.of(ae.decode, latents.mean, parts.train)
    evaluator = InLoopEval.of(CFG.data, parts.train)
    z = torch.randn(BATCH, *SHAPE, generator=gen)

    def step() -> None:
        t, eps = sample_t(BATCH, "uniform", gen), torch.randn(z.shape, generator=gen)
        train_step(model, list(model.parameters()), opt, param, z, t, eps, 1.0)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    images = torch.randint(0, 256, (CFG.sample.during_training_num, 1, 32, 32), dtype=torch.uint8)
    work = {"validation": lambda: validation.measure(model, ema.model, lambda m: m, param,
                                                       vset, 1.0),
            "copy check": lambda: vm.copy_vitals(images, reference),
            "eval": lambda: evaluator.measure(ema.model, ae, 1.0, CFG)}
    runs: dict[str, list[float]] = {"step": [], **{name: [] for name in work}}
    for _ in range(3):
        runs["step"].append(seconds_per_step(step))
        for name, fn in work.items():
            runs[name].append(timed(fn))
    b, v, c, e = (statistics.median(runs[k]) for k in ("step", *work))
    val_share, eval_share = v / (500 * b), e / (1000 * b)
    val_ok, eval_ok = ("met" if val_share <= 0.03 else "missed"), \
        ("met" if eval_share <= 0.1 else "missed")
    return f"""## Validation, copy check and in-loop eval (`benchmarks/throughput.py validation`)

Machine: {machine()}. Demo UNet and autoencoder (digits, {len(parts.held_out)} held-out
images), medians of 3 rounds, alternating with training steps (batch {BATCH}). A validation
scores {validation.POINTS} fixed points three times (raw and EMA weights, and the training
images' probe); the copy check compares a sampling's {len(images)} images with the
{len(reference.train)} decoded training images; an in-loop eval samples 256 images with
DPM-Solver++ 20 steps, decodes and embeds them.

| step | validation | copy check | eval | validation / 500 steps (<= 3 %) | eval / 1000 steps (<= 10 %) |
|---|---|---|---|---|---|
| {b * 1e3:.1f} ms | {v:.2f} s | {c * 1e3:.1f} ms | {e:.2f} s | {val_share:.2%} ({val_ok}) | \
{eval_share:.2%} ({eval_ok}) |

The default `train.val_every` is 250 ({2 * val_share:.2%} of training time). The copy
check runs once per sampling, next to a sampling that costs seconds.
"""


def ratio_seconds(params_list: list[torch.Tensor], scratch: list[torch.Tensor]) -> float:
    """The update ratio's own work on one measured step: the copy before the update, the norms."""
    times = []
    for _ in range(50):
        start = time.perf_counter()
        torch._foreach_copy_(scratch, [p.detach() for p in params_list])
        vm.update_ratio(scratch, [p.detach() for p in params_list]).item()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """All sections, or those named on the command line (``throughput``, ``dit``, ``overhead``,
    ``validation``)."""
    sections = {"throughput": throughput_section, "dit": dit_section,
                "overhead": overhead_section, "validation": validation_section}
    for name in sys.argv[1:] or list(sections):
        body = sections[name]()
        write_section(name, body)
        print(body)


if __name__ == "__main__":
    main()
