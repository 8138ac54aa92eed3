"""Objectives and backbones on MNIST: the same stage-2 wall-clock budget each, then quality.

Run: ``.venv/bin/python benchmarks/objectives.py`` (needs ``../shared/data/mnist``; about 50
minutes on 2 cores; ``--minutes 1`` for a smoke run). eps, v and flow matching on the demo's
UNet, and flow matching on ``configs/digits-dit.yaml``'s DiT, train one after the other (never
side by side) on the shared stage 1 and latent cache (``_mnist.py``), each as an ``ldmkit
train`` subprocess whose clock starts at launch and which is stopped with SIGTERM at the budget
(it checkpoints). ``train.steps`` is set from each backbone's measured step time, so that the
cosine decay ends near the budget. Each final EMA model is sampled from the same noise with
DPM-Solver++(2M) at 20 steps; the flow models also with Heun at 6 steps (11 network
evaluations) and Euler at 100, the usual samplers of rectified flow. Scored with
``ldmkit.sampling.evaluate.quality_metrics`` on ``EVAL_NUM`` samples.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mnist import (  # noqa: E402
    CONFIG,
    EVAL_SEED,
    ROOT,
    WORK,
    config,
    reference,
    stage1,
    train_for,
)
from report import machine, write_section  # noqa: E402
from throughput import seconds_per_step, step_fn  # noqa: E402

from ldmkit.config import from_dict, load_config  # noqa: E402
from ldmkit.models.registry import backbone_spec, build_backbone  # noqa: E402
from ldmkit.sampling.evaluate import quality_metrics  # noqa: E402
from ldmkit.sampling.generate import generate  # noqa: E402
from ldmkit.sampling.trained import load_for_sampling  # noqa: E402

EVAL_NUM = 2000
FLOW = ["diffusion.objective=flow", "diffusion.schedule=linear"]
DIT = load_config(ROOT / "configs/digits-dit.yaml").model
DIT_SET = (f"model={{type: dit, patch_size: {DIT.patch_size}, hidden_size: {DIT.hidden_size}, "
           f"depth: {DIT.depth}, num_heads: {DIT.num_heads}}}")
VARIANTS = {"eps, UNet": [], "v, UNet": ["diffusion.objective=v"], "flow, UNet": FLOW,
            "flow, DiT": [*FLOW, DIT_SET, "train.lr=5e-4"]}  # the DiT config's rate
SAMPLERS = {"eps": [("dpmpp_2m", 20)], "v": [("dpmpp_2m", 20)],
            "flow": [("dpmpp_2m", 20), ("heun", 6), ("euler", 100)]}
RESULTS = WORK / "objectives.json"


def step_seconds(model_sets: list[str]) -> float:
    """Median seconds of one training step of the variant's backbone at the config's batch."""
    cfg = config(*model_sets)
    step = step_fn(build_backbone(backbone_spec(cfg.model, 4, 8)), False)
    step()
    return sorted(seconds_per_step(step, 5) for _ in range(3))[1]


def train_variant(name: str, sets: list[str], budget_s: float, scale: float) -> Path:
    run_dir = WORK / ("objective-" + name.replace(", ", "-").lower())
    shutil.rmtree(run_dir, ignore_errors=True)
    train_for(budget_s, run_dir, CONFIG, scale, int(0.9 * budget_s / step_seconds(sets)), *sets)
    return run_dir


def score(run_dir: Path, ref, objective: str) -> list[dict]:
    cfg_dict, step, model, ae, scale, _ = load_for_sampling(run_dir)
    cfg, rows = from_dict(cfg_dict), []
    for sampler, steps in SAMPLERS[objective]:
        started = time.perf_counter()
        samples = generate(model, ae, scale, cfg, EVAL_NUM, sampler, steps, EVAL_SEED)
        rows.append({"step": step, "sampler": sampler, "steps": steps,
                     "sample_s": time.perf_counter() - started,
                     **quality_metrics(ref, samples.images)})
    return rows


def section(results: dict) -> str:
    rows = []
    for name, scored in results["variants"].items():
        for r in scored:
            evals = 2 * r["steps"] - 1 if r["sampler"] == "heun" else r["steps"]
            rows.append(f"| {name} | {r['step']} | {r['sampler']} {r['steps']} ({evals} NFE) | "
                        f"{r['eval/fd']:.2f} | {r['eval/precision']:.3f} | "
                        f"{r['eval/recall']:.3f} | {r['eval/class_coverage']:.3f} | "
                        f"{r['sample_s']:.0f} s |")
    return f"""## Objectives and backbones on MNIST (`benchmarks/objectives.py`)

Machine: {results['machine']}. Command: `.venv/bin/python benchmarks/objectives.py`.
Each variant: {results['minutes']:g} minutes of stage 2 (from launch, start-up included) on the
shared MNIST stage 1 (latents 4x8x8, scale {results['scale']:.4f}), batch 128, lr 1e-3 (DiT:
5e-4, as in its config), EMA weights; {EVAL_NUM} samples from the same noise; sampling time
for all {EVAL_NUM}. UNet: the demo's (1.08 M parameters); DiT: `configs/digits-dit.yaml`'s
({DIT.hidden_size} wide, {DIT.depth} deep, patch {DIT.patch_size}). One run each: the
seed-to-seed spread is not measured.

| objective, backbone | steps | sampler | FD | precision | recall | class coverage | sampling |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{_reading(results["variants"])}
"""


def _reading(variants: dict) -> str:
    """The table's answers in words: which objective, and which sampler for flow."""
    fd = {name: {r["sampler"]: r["eval/fd"] for r in rows} for name, rows in variants.items()}
    best = min(fd, key=lambda n: fd[n]["dpmpp_2m"])
    flow = fd.get("flow, UNet", {})
    text = (f"At this budget, with DPM-Solver++(2M) 20 steps, {best} has the lowest FD "
            f"({fd[best]['dpmpp_2m']:.1f}; " + ", ".join(
                f"{n} {v['dpmpp_2m']:.1f}" for n, v in fd.items() if n != best) + ").")
    if {"dpmpp_2m", "heun", "euler"} <= set(flow):
        text += (f" For flow matching, DPM-Solver++(2M) at 20 network evaluations matches Euler "
                 f"at 100 (FD {flow['dpmpp_2m']:.1f} vs {flow['euler']:.1f}); Heun at 11 "
                 f"evaluations is behind ({flow['heun']:.1f}).")
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--dry", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--report", action="store_true",
                        help=f"rewrite the section from {RESULTS.name} without training")
    args = parser.parse_args()
    if args.report:
        write_section("objectives", section(json.loads(RESULTS.read_text())))
        return
    setup = stage1()
    ref = reference(setup.cfg, EVAL_NUM)
    results = {"machine": machine(), "minutes": args.minutes, "scale": setup.scale,
               "variants": {}}
    for name, sets in VARIANTS.items():
        run_dir = train_variant(name, sets, args.minutes * 60, setup.scale)
        results["variants"][name] = score(run_dir, ref, name.split(",")[0])
        print(name, json.dumps(results["variants"][name]), flush=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    body = section(results)
    if not args.dry:
        write_section("objectives", body)
    print(body)


if __name__ == "__main__":
    main()
