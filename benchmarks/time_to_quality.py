"""Time to quality on MNIST: ldmkit vs a diffusers reference loop with the same wall-clock budget.

Run: ``.venv/bin/python benchmarks/time_to_quality.py`` (needs ``../shared/data/mnist`` and the
``bench`` extra; about 95 minutes on 2 cores; ``--report`` re-renders BENCHMARKS.md from the saved
results). All loops train stage 2 on the same cached latents (``_mnist.py``), the same batch size
and UNet size, one after the other (never side by side, so none slows another), for
``BUDGETS_MIN[-1]`` minutes, and are judged at each budget with the weights they had then:

- ldmkit: ``python -m ldmkit train configs/mnist.yaml`` in a subprocess, its clock started at
  launch (imports, start-up and compilation count against it), on the fast path ``auto``
  chooses, ``train.steps`` set so that the cosine decay ends at the last budget, a checkpoint
  every ~30 s, once per seed of ``SEEDS``; at a budget, its newest checkpoint written within the
  budget is evaluated (EMA weights).
- reference: diffusers' ``UNet2DModel`` + ``DDPMScheduler`` with the recipe of diffusers'
  ``train_unconditional.py`` example (AdamW 1e-4, betas 0.95/0.999, weight decay 1e-6, 500
  warmup steps then cosine, EMAModel with warmup power 3/4, gradient clipping 1), except the
  batch size, which is ldmkit's so that both see as many images per step, the precision (the
  faster here of fp32 and bf16 autocast, which ``--mixed_precision bf16`` gives it), and the
  learning rate, swept over ``REFERENCE_LRS`` (around the best of an earlier sweep from the recipe's 1e-4) so
  that ldmkit is compared with a tuned peer, not only with a recipe; its EMA weights are copied
  at each budget.

Each is sampled with its own library's DPM-Solver++(2M), 20 steps, from the same noise, decoded
by the shared decoder and scored with ``ldmkit.sampling.evaluate.quality_metrics``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mnist import CONFIG, EVAL_SEED, LDMKIT_20MIN, STAGE1, WORK, Setup, reference, stage1  # noqa: E402
from report import machine, write_section  # noqa: E402
from throughput import diffusers_unet, path_step, seconds_per_step, step_fn  # noqa: E402

from ldmkit.data.sources import BatchOrder  # noqa: E402
from ldmkit.run.checkpoint import list_checkpoints  # noqa: E402
from ldmkit.sampling.evaluate import Reference, quality_metrics  # noqa: E402
from ldmkit.sampling.generate import decode_images, generate, start_noise  # noqa: E402
from ldmkit.sampling.trained import load_for_sampling  # noqa: E402

BUDGETS_MIN = (5, 10, 20)
EVAL_NUM = 2000
EVAL_STEPS = 20
CHECKPOINTS_PER_RUN = 40
REFERENCE_LRS = (1e-3, 2e-3)  # around the best of an earlier sweep (1e-4, 3e-4, 1e-3)
SEEDS = (0, 1)  # ldmkit's, so that its seed-to-seed spread is known
GUESS_STEPS = 8000  # about a 20-minute run: which fast path auto chooses
RESULTS = WORK / "time_to_quality.json"


@dataclass
class Snapshot:
    budget_s: float
    elapsed_s: float  # when these weights existed, from the loop's start
    step: int
    weights: Path | dict[str, torch.Tensor]  # an ldmkit checkpoint, or reference EMA weights


def calibrate(setup: Setup) -> dict:
    """Seconds per training step of each loop at this batch (median of 3 alternating rounds):
    ldmkit's on the path ``auto`` chooses for a run of this length; the reference's in fp32 and,
    where ldmkit's is bf16, in bf16 autocast too, so that it trains in whichever is faster, as a
    tuned peer would (on this CPU torch's bf16 attention backward is slow, BENCHMARKS.md)."""
    ours, fast = path_step(setup.cfg, GUESS_STEPS)
    steps = {"ldmkit": ours}
    for bf16 in (False, True) if fast.bf16 else (False,):
        model = diffusers_unet()
        steps["reference bf16" if bf16 else "reference fp32"] = step_fn(
            model, True, functools.partial(reference_forward, model, bf16))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(3):
        for name, step in steps.items():
            times[name].append(seconds_per_step(step, 10))
    sec = {name: statistics.median(t) for name, t in times.items()}
    bf16 = sec.get("reference bf16", float("inf")) < sec["reference fp32"]
    return {"path": fast.describe(), "compiled": fast.compile, "reference_bf16": bf16,
            "reference": sec["reference bf16" if bf16 else "reference fp32"], **sec}


def reference_forward(model: UNet2DModel, bf16: bool, x: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
    with reference_autocast(bf16):
        return model(x, (t * 999).long()).sample.float()


def reference_autocast(bf16: bool) -> contextlib.AbstractContextManager:
    """What ``accelerate launch --mixed_precision bf16 train_unconditional.py`` does to the
    forward pass: bf16 autocast; the loss, weights and optimizer stay fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def ldmkit_run(seed: int) -> Path:
    """Seed 0's run is the one ``sampler_quality.py`` samples."""
    return LDMKIT_20MIN if seed == 0 else LDMKIT_20MIN.with_name(f"ldmkit-seed{seed}")


def train_ldmkit(setup: Setup, budgets_s: list[float], steps: int, seed: int) -> list[Snapshot]:
    """``ldmkit train`` in a subprocess, stopped (SIGTERM, it checkpoints) at the last budget."""
    run_dir = ldmkit_run(seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    sets = [f"run_dir={run_dir}", f"seed={seed}", f"data.path={setup.cfg.data.path}",
            f"data.latent_cache={setup.cfg.data.latent_cache}", f"autoencoder.pretrained={STAGE1}",
            f"diffusion.latent_scale_factor={setup.scale}", f"train.steps={steps}",
            f"train.checkpoint_every={max(1, steps // CHECKPOINTS_PER_RUN)}",
            f"train.checkpoint_keep={CHECKPOINTS_PER_RUN + 2}"]
    cmd = [sys.executable, "-m", "ldmkit", "train", str(CONFIG)]
    for s in sets:
        cmd += ["--set", s]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with (WORK / f"{run_dir.name}-train.log").open("w") as log:
        started = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=budgets_s[-1])
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"ldmkit train failed (exit {proc.returncode}); see {log.name}")
    written = [((p / "meta.json").stat().st_mtime - started, p)
               for p in list_checkpoints(run_dir / "checkpoints")]
    snaps = []
    for budget in budgets_s:
        elapsed, path = max((w for w in written if w[0] <= budget), key=lambda w: w[0])
        snaps.append(Snapshot(budget, elapsed, int(path.name.split("_")[1]), path))
    return snaps


def ddpm_schedule() -> DDPMScheduler:
    """The reference's training noise schedule (the example's default: 1000 linear betas)."""
    return DDPMScheduler(num_train_timesteps=1000)


def train_reference(setup: Setup, budgets_s: list[float], steps: int, lr: float,
                    bf16: bool) -> list[Snapshot]:
    """diffusers' unconditional training recipe at ``lr`` on the cached latents, EMA copied at
    budgets; in bf16 autocast where ``calibrate`` measured that faster than fp32."""
    started = time.monotonic()
    torch.manual_seed(0)
    model = diffusers_unet()
    noise_scheduler = ddpm_schedule()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.95, 0.999),
                            weight_decay=1e-6, eps=1e-8)
    lr_schedule = get_cosine_schedule_with_warmup(opt, 500, steps)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    order = BatchOrder(len(setup.latents.mean), setup.cfg.train.batch_size, 1)
    gen = torch.Generator().manual_seed(2)
    pending, snaps, step = list(budgets_s), [], 0
    while pending:
        elapsed = time.monotonic() - started
        if elapsed >= pending[0] or step == steps:
            ema_model = diffusers_unet()
            ema.copy_to(ema_model.parameters())
            snaps.append(Snapshot(pending.pop(0), elapsed, step, ema_model.state_dict()))
            continue
        z = setup.scale * setup.latents.sample(order.next(), gen)
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(z),), generator=gen)
        with reference_autocast(bf16):
            pred = model(noise_scheduler.add_noise(z, noise, t), t).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_schedule.step()
        ema.step(model.parameters())
        step += 1
    return snaps


@torch.no_grad()
def sample_reference(model: UNet2DModel, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' DPM-Solver++(2M) over the DDPM training schedule, 250 latents at a time."""
    scheduler = DPMSolverMultistepScheduler.from_config(ddpm_schedule().config)
    out = []
    for x in noise.split(250):
        scheduler.set_timesteps(steps)  # also resets the solver's history
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t).sample, t, x).prev_sample
        out.append(x)
    return torch.cat(out)


def score_ldmkit(setup: Setup, ref: Reference, snap: Snapshot) -> dict[str, float]:
    _, _, model, ae, scale, _ = load_for_sampling(snap.weights.parents[1], snap.weights)
    samples = generate(model, ae, scale, setup.cfg, EVAL_NUM, "dpmpp_2m", EVAL_STEPS, EVAL_SEED)
    return quality_metrics(ref, samples.images)


def score_reference(setup: Setup, ref: Reference, snap: Snapshot) -> dict[str, float]:
    model = diffusers_unet().eval()
    model.load_state_dict(snap.weights)
    noise, _ = start_noise(EVAL_NUM, tuple(setup.latents.mean.shape[1:]), EVAL_SEED)
    latents = sample_reference(model, noise, EVAL_STEPS) / setup.scale
    return quality_metrics(ref, decode_images(setup.ae, latents))


def reference_name(lr: float) -> str:
    return f"diffusers reference, lr {lr:.0e}".replace("e-0", "e-")


def section(results: dict) -> str:
    loops = results["loops"]
    ours = [name for name in loops if name.startswith("ldmkit")]
    references = [name for name in loops if name not in ours]
    rows, verdicts, ratios = [], [], []
    for i in range(len(results["budgets_min"])):
        best = min(references, key=lambda name: loops[name][i]["eval/fd"])
        worst = max(ours, key=lambda name: loops[name][i]["eval/fd"])
        ratio = loops[best][i]["eval/fd"] / max(loops[worst][i]["eval/fd"], 1e-9)
        ok = ratio >= 1.5 and all(loops[name][i]["eval/class_coverage"] >= 0.95 for name in ours)
        verdicts.append(ok)
        for name in (*ours, *references):
            r = loops[name][i]
            rows.append(f"| {r['budget_min']:g} min | {name} | {r['elapsed_s'] / 60:.1f} min | "
                        f"{r['step']} | {r['eval/fd']:.2f} | {r['eval/precision']:.3f} | "
                        f"{r['eval/recall']:.3f} | {r['eval/class_coverage']:.3f} | "
                        f"{r['eval/memorization']:.3f} |")
        rows.append(f"| | FD ratio best reference (lr {lr_text(best)}) / worse ldmkit seed | | | "
                    f"**{ratio:.2f}x** | | | | {'met' if ok else 'missed'} |")
        ratios.append(ratio)
    sec = results["seconds_per_step"]
    lrs = ", ".join(lr_text(reference_name(lr)) for lr in results["reference_lrs"])
    minutes = results["budgets_min"][-1]
    precision = ("bf16 autocast as its `--mixed_precision bf16` runs" if sec["reference_bf16"]
                 else "fp32")
    timed = ", ".join(f"{name[len('reference '):]} {sec[name] * 1e3:.0f} ms" for name in sec
                      if name.startswith("reference ") and name != "reference")
    return f"""## Time to quality on MNIST (`benchmarks/time_to_quality.py`)

Machine: {results['machine']}. Command: `.venv/bin/python benchmarks/time_to_quality.py`.
MNIST train split (60000 images at 32x32) through one shared autoencoder into a latent cache
(4x8x8, scale {results['scale']:.4f}); stage 2 only is timed. All loops: batch 128, UNets of
1.08 M (ldmkit) and 1.00 M (diffusers) parameters. ldmkit is `ldmkit train configs/mnist.yaml`
as shipped ({results['recipe']}; vital signs, validation, TensorBoard and checkpoints on), run as
a subprocess whose clock includes its start-up and compilation, on the fast path `auto` chose:
{sec['path']}; two seeds ({', '.join(str(s) for s in results['seeds'])}). The reference
follows diffusers' `train_unconditional.py` recipe (UNet2DModel + DDPMScheduler with linear
betas, eps, AdamW, 500 warmup steps, cosine, EMAModel power 3/4, clipping 1) with the batch size
matched, eager, in {precision}, the faster on this machine (bare step {timed}), and its
learning rate swept
over {lrs} (the recipe's is 1e-4) so that ldmkit is compared with a tuned peer; each budget's
ratio is taken against the reference learning rate that did best at that budget and ldmkit's
worse seed. Bare training steps measured side by side: {sec['ldmkit'] * 1e3:.0f} ms (ldmkit)
and {sec['reference'] * 1e3:.0f} ms (reference). One {minutes:g}-minute run per loop, one after
the other, evaluated with the EMA weights it had at each budget (so before the last budget the
learning rate has not decayed yet, for every loop); ldmkit at its newest checkpoint written
within the budget. {results['eval_num']} samples each, DPM-Solver++(2M) {results['eval_steps']}
steps of its own library from the same noise, against {results['eval_num']} MNIST test images;
features of the in-project MNIST classifier ({results['classifier_accuracy']:.1%} test accuracy).

Target: ldmkit's FD at least 1.5x lower than the best reference's at every budget, class
coverage at least 0.95: **{'met' if all(verdicts) else 'missed'}**.

| budget | loop | weights from | steps | FD | precision | recall | class coverage | memorization |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{_reading(loops, ours, references, ratios, sec)}
"""


def lr_text(name: str) -> str:
    return name.rsplit(" ", 1)[1]


def _reading(loops: dict, ours: list[str], references: list[str], ratios: list[float],
             sec: dict) -> str:
    """What the figures say, from the figures."""
    last = [loops[name][-1] for name in ours]
    spread = max(r["eval/fd"] for r in last) / min(r["eval/fd"] for r in last)
    steps = [loops[name][-1]["step"] for name in references]
    text = (f"At the {len(ratios)} budgets the best reference's FD is "
            + ", ".join(f"{r:.2f}x" for r in ratios)
            + " ldmkit's worse seed; ldmkit's two seeds differ by "
            f"{spread:.2f}x in FD at the last budget. In the last budget ldmkit made "
            f"{min(r['step'] for r in last)} to {max(r['step'] for r in last)} steps and the "
            f"reference {min(steps)} to {max(steps)}: its bare step takes "
            f"{sec['reference'] / sec['ldmkit']:.2f}x ldmkit's"
            + (", which is compiled. " if sec["compiled"] else ". ")
            + "The reference is not compiled because its UNet upsamples with F.interpolate "
            "(nearest), the operation whose compiled backward inductor gets wrong in bf16 "
            "(`benchmarks/inductor_upsample_repro.py`): compiled, it would train only its top "
            "levels, as ldmkit's did before the route-around.")
    return textwrap.fill(text, 95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=BUDGETS_MIN,
                        help="minutes (a short smoke run: --budgets 0.5 1 --dry)")
    parser.add_argument("--reference-lrs", type=float, nargs="+", default=REFERENCE_LRS)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--dry", action="store_true", help="print, write nothing to BENCHMARKS.md")
    parser.add_argument("--report", action="store_true",
                        help=f"re-render BENCHMARKS.md from {RESULTS.name}; train nothing")
    args = parser.parse_args()
    if args.report:
        write_section("time_to_quality", section(json.loads(RESULTS.read_text())))
        return
    budgets_s = [m * 60 for m in args.budgets]
    setup = stage1()
    ref = reference(setup.cfg, EVAL_NUM)
    sec = calibrate(setup)
    print(f"seconds per step: {sec}", flush=True)
    results = {"machine": machine(), "scale": setup.scale, "budgets_min": list(args.budgets),
               "seconds_per_step": sec, "eval_num": EVAL_NUM, "eval_steps": EVAL_STEPS,
               "classifier_accuracy": ref.clf.held_out_accuracy, "recipe": recipe(setup.cfg),
               "reference_lrs": list(args.reference_lrs), "seeds": list(args.seeds),
               "loops": {}}
    loops = [(f"ldmkit, seed {seed}", functools.partial(train_ldmkit, seed=seed), score_ldmkit,
              sec["ldmkit"]) for seed in args.seeds]
    loops += [(reference_name(lr), functools.partial(train_reference, lr=lr, bf16=sec["reference_bf16"]),
               score_reference, sec["reference"]) for lr in args.reference_lrs]
    for name, train, score, seconds in loops:
        snaps = train(setup, budgets_s, int(0.9 * budgets_s[-1] / seconds))
        results["loops"][name] = []
        for snap in snaps:
            values = {"budget_min": snap.budget_s / 60, "elapsed_s": snap.elapsed_s,
                      "step": snap.step, **score(setup, ref, snap)}
            print(name, json.dumps(values), flush=True)
            results["loops"][name].append(values)
        if not args.dry:
            RESULTS.write_text(json.dumps(results, indent=2))
    body = section(results)
    print(body)
    if not args.dry:
        write_section("time_to_quality", body)


def recipe(cfg) -> str:
    """configs/mnist.yaml's recipe in words, read from the config, not restated."""
    d, t = cfg.diffusion, cfg.train
    sampling = ("logit-normal t" if d.t_sampling == "logit_normal" else "uniform t")
    return (f"{d.objective}, {d.schedule} schedule, {sampling}, loss weighting "
            f"{d.loss_weighting}, lr {t.lr:g}, {t.warmup_steps} warmup steps, cosine to "
            f"{t.min_lr_ratio:.0%}, EMA {t.ema_decay:g}")


if __name__ == "__main__":
    main()
