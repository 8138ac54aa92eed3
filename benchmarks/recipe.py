"""Choosing configs/mnist.yaml's recipe by measurement, on the fast path.

Run: ``.venv/bin/python benchmarks/recipe.py`` (needs ``../shared/data/mnist``; about 30 minutes
on 2 cores; ``--minutes 0.5 --dry`` for a smoke run). Each variant of the recipe (objective,
timestep sampling, learning rate) trains one after the other (never side by side) on the shared
stage 1 and latent cache (``_mnist.py``) as an ``ldmkit train`` subprocess on the fast path
that ``auto`` chooses (bf16 autocast where the CPU computes bf16, compiled where it pays), its
clock started at launch and stopped with SIGTERM after ``--minutes``. ``train.steps`` is the
step count of ``time_to_quality.py``'s 20-minute horizon, so that each variant is judged at its
first budget with the learning rate it will have there. Each final EMA model is sampled with
DPM-Solver++(2M) at 20 steps from the same noise and scored with
``ldmkit.sampling.evaluate.quality_metrics``. The winner becomes configs/mnist.yaml's recipe and
is then judged against the tuned peer by ``time_to_quality.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mnist import CONFIG, EVAL_SEED, WORK, config, reference, stage1, train_for  # noqa: E402
from objectives import FLOW  # noqa: E402
from report import machine, write_section  # noqa: E402
from throughput import path_step, seconds_per_step  # noqa: E402

from ldmkit.config import from_dict  # noqa: E402
from ldmkit.sampling.evaluate import quality_metrics  # noqa: E402
from ldmkit.sampling.generate import generate  # noqa: E402
from ldmkit.sampling.trained import load_for_sampling  # noqa: E402

EVAL_NUM = 2000
HORIZON_MIN = 20  # time_to_quality.py's last budget
FAST = ["train.precision=auto", "train.compile=auto"]
VARIANTS = {
    "eps, uniform t, lr 1e-3": [],
    "v, uniform t, lr 1e-3": ["diffusion.objective=v"],
    "flow, uniform t, lr 1e-3": FLOW,
    "flow, logit-normal t, lr 1e-3": [*FLOW, "diffusion.t_sampling=logit_normal"],
    "flow, uniform t, lr 2e-3": [*FLOW, "train.lr=2e-3"],
}
RESULTS = WORK / "recipe.json"


def fast_step_seconds() -> tuple[float, str]:
    """Seconds per bare step on the path a run of the horizon's length takes, and that path."""
    guess = int(HORIZON_MIN * 60 / 0.15)
    step, fast = path_step(config(*FAST), guess)
    step()
    return statistics.median(seconds_per_step(step, 10) for _ in range(3)), fast.describe()


def score(run_dir: Path, ref) -> dict:
    cfg_dict, step, model, ae, scale, _ = load_for_sampling(run_dir)
    samples = generate(model, ae, scale, from_dict(cfg_dict), EVAL_NUM, "dpmpp_2m", 20, EVAL_SEED)
    return {"step": step, **quality_metrics(ref, samples.images)}


def section(results: dict) -> str:
    variants = results["variants"]
    best = min(variants, key=lambda name: variants[name]["eval/fd"])
    rows = [f"| {name}{' (chosen)' if name == best else ''} | {r['step']} | {r['eval/fd']:.2f} | "
            f"{r['eval/precision']:.3f} | {r['eval/recall']:.3f} | "
            f"{r['eval/class_coverage']:.3f} |" for name, r in variants.items()]
    base = variants[next(iter(variants))]["eval/fd"]
    return f"""## Choosing the MNIST recipe (`benchmarks/recipe.py`)

Machine: {results['machine']}. Command: `.venv/bin/python benchmarks/recipe.py`.
Each variant: {results['minutes']:g} minutes of stage 2 (from launch, start-up and compilation
included) on the shared MNIST stage 1 (scale {results['scale']:.4f}), configs/mnist.yaml
otherwise (batch 128, 100 warmup steps, cosine decay, EMA 0.999, no loss weighting: these were
kept, not screened), on the fast path `auto` chose, {results['step_ms']:.0f} ms per bare step:
{results['path']}. `train.steps` = {results['steps']}, the {HORIZON_MIN}-minute horizon of
`time_to_quality.py`, so each variant is judged at its first budget with the learning rate it
has there. {EVAL_NUM} samples
(EMA weights, DPM-Solver++(2M) 20 steps, the same noise) against {EVAL_NUM} MNIST test images.
One run each: the seed-to-seed spread is not measured here (it is in `time_to_quality.py`'s two
seeds). flow: rectified flow on the linear schedule; logit-normal t: SD3's timestep density
(loc 0, scale 1).

| recipe | steps | FD | precision | recall | class coverage |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Lowest FD: {best} ({variants[best]['eval/fd']:.2f}, {base / variants[best]['eval/fd']:.2f}x
lower than the first row, the recipe before this measurement); it is configs/mnist.yaml's
recipe now. Variants not in the table (such as two changes that each helped, combined) were not
run.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="a subset of variants")
    parser.add_argument("--dry", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--report", action="store_true",
                        help=f"rewrite the section from {RESULTS.name} without training")
    args = parser.parse_args()
    if args.report:
        write_section("recipe", section(json.loads(RESULTS.read_text())))
        return
    setup = stage1()
    ref = reference(setup.cfg, EVAL_NUM)
    seconds, path = fast_step_seconds()
    steps = int(0.9 * HORIZON_MIN * 60 / seconds)
    print(f"{path}: {seconds * 1e3:.0f} ms per step, train.steps={steps}", flush=True)
    results = json.loads(RESULTS.read_text()) if args.only and RESULTS.exists() else {
        "variants": {}}
    results.update({"machine": machine(), "minutes": args.minutes, "scale": setup.scale,
                    "path": path, "step_ms": seconds * 1e3, "steps": steps})
    for name in args.only or VARIANTS:
        run_dir = WORK / ("recipe-" + name.replace(", ", "-").replace(" ", "").lower())
        shutil.rmtree(run_dir, ignore_errors=True)
        train_for(args.minutes * 60, run_dir, CONFIG, setup.scale, steps, *FAST, *VARIANTS[name])
        results["variants"][name] = score(run_dir, ref)
        print(name, json.dumps(results["variants"][name]), flush=True)
        if not args.dry:
            RESULTS.write_text(json.dumps(results, indent=2))
    body = section(results)
    if not args.dry:
        write_section("recipe", body)
    print(body)


if __name__ == "__main__":
    main()
