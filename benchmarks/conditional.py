"""Class-conditional models: what classifier-free guidance costs, and what it buys on MNIST and emoji.

Run: ``.venv/bin/python benchmarks/conditional.py [cost] [mnist] [emoji]`` (all by default; ``mnist``
needs ``../shared/data/mnist`` and takes about 15 minutes on 2 cores; ``--report`` re-renders
BENCHMARKS.md from the saved results).

- ``cost``: one sampling step (a denoiser call on 64 latents of 4x8x8) of the MNIST UNet and
  of ``configs/digits-dit.yaml``'s DiT, each unconditional and class-conditional with guidance
  4 (the conditional and unconditional halves in one batched forward), alternated in one
  process, medians of 7 rounds of 20 calls. Target: guided at most 2.05x the unconditional.
- ``mnist``: ``configs/mnist-cond.yaml`` trained for ``MINUTES`` of stage 2 on the shared MNIST
  stage 1 (``_mnist.py``; the latent cache holds the labels), as an ``ldmkit train`` subprocess
  stopped with SIGTERM at the budget, then sampled from the same noise at each of ``SCALES``
  (DPM-Solver++(2M), 20 steps, every class in turn) and scored with
  ``ldmkit.sampling.evaluate.quality_metrics``: FD, precision, recall and class accuracy per scale.
- ``emoji``: ``ldmkit run configs/emoji.yaml`` as it ships (both stages, sampling, report),
  timed as a subprocess, then ``ldmkit eval --guidance`` over ``EMOJI_SCALES`` with
  ``EMOJI_NUM`` samples each against the emoji images the in-project classifier holds out.
  About 35 minutes on 2 cores; needs ``../shared/data/emoji-google``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mnist import DATA, EVAL_SEED, ROOT, WORK, reference, stage1, train_for  # noqa: E402
from objectives import step_seconds  # noqa: E402
from report import machine, parts_cli, write_section  # noqa: E402

from ldmkit.config import from_dict, load_config  # noqa: E402
from ldmkit.diffusion.condition import LABELS  # noqa: E402
from ldmkit.diffusion.parameterization import Parameterization  # noqa: E402
from ldmkit.models.registry import backbone_spec, build_backbone  # noqa: E402
from ldmkit.sampling.evaluate import eval_run, quality_metrics  # noqa: E402
from ldmkit.sampling.generate import generate  # noqa: E402
from ldmkit.sampling.trained import load_for_sampling  # noqa: E402
from ldmkit.vitals import metrics as vm  # noqa: E402
from ldmkit.vitals.metrics import guidance_tag  # noqa: E402

CONFIG = ROOT / "configs/mnist-cond.yaml"
RUN = WORK / "conditional-mnist"
RESULTS = WORK / "conditional.json"
MINUTES = 10
SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
EVAL_NUM = 2000
BATCH, ROUNDS, CALLS = 64, 7, 20
EMOJI_CONFIG = ROOT / "configs/emoji.yaml"
EMOJI_DATA = ROOT.parent / "shared/data/emoji-google/images"
EMOJI_RUN = ROOT / "runs/bench-emoji"
EMOJI_SCALES = (1.0, 2.0, 3.0, 4.0, 6.0)
EMOJI_NUM = 800  # the classifier holds out half of the 1636 images: 818 to compare with
PARTS = ("cost", "mnist", "emoji")
QUALITY = ("eval/fd", "eval/precision", "eval/recall", vm.EVAL_CLASS_ACCURACY)


def step_cost() -> dict[str, dict[str, float]]:
    """Milliseconds per denoiser call: unconditional vs guided, per backbone."""
    torch.manual_seed(0)
    param, figures = Parameterization(), {}
    x, t = torch.randn(BATCH, 4, 8, 8), torch.full((BATCH,), 0.5)
    labels = {LABELS: torch.arange(BATCH) % 10}
    for name, model_cfg in (("UNet", load_config(CONFIG).model),
                            ("DiT", load_config(ROOT / "configs/digits-dit.yaml").model)):
        spec = backbone_spec(model_cfg, 4, 8)
        spec["args"]["num_classes"] = None
        plain = build_backbone(spec).eval()
        spec["args"]["num_classes"] = 10
        conditional = build_backbone(spec).eval()
        calls = {"unconditional": param.denoiser(plain),
                 "guided": param.denoiser(conditional, labels, 4.0)}
        times: dict[str, list[float]] = {k: [] for k in calls}
        with torch.no_grad():
            for call in calls.values():
                call(x, t)
            for _ in range(ROUNDS):
                for key, call in calls.items():
                    start = time.perf_counter()
                    for _ in range(CALLS):
                        call(x, t)
                    times[key].append((time.perf_counter() - start) / CALLS * 1e3)
        figures[name] = {k: statistics.median(v) for k, v in times.items()}
        print(name, figures[name], flush=True)
    return figures


def train_mnist(scale: float) -> Path:
    shutil.rmtree(RUN, ignore_errors=True)
    budget = MINUTES * 60
    sets = ["model.num_classes=10"]
    train_for(budget, RUN, CONFIG, scale, int(0.9 * budget / step_seconds(sets)))
    return RUN


def sweep() -> list[dict]:
    setup = stage1()
    ref = reference(setup.cfg, EVAL_NUM)
    train_mnist(setup.scale)
    cfg_dict, step, model, ae, scale, _ = load_for_sampling(RUN)
    cfg, rows = from_dict(cfg_dict), []
    for g in SCALES:
        samples = generate(model, ae, scale, cfg, EVAL_NUM, "dpmpp_2m", 20, EVAL_SEED,
                           guidance=g)
        rows.append({"guidance": g, "step": step, **quality_metrics(ref, samples.images,
                                                                    samples.labels)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def emoji() -> dict:
    """The shipped emoji config end to end (timed), then its guidance sweep."""
    if not EMOJI_DATA.is_dir():
        raise SystemExit(f"the emoji set is not at {EMOJI_DATA}")
    if EMOJI_RUN.exists():
        shutil.rmtree(EMOJI_RUN)
    start = time.perf_counter()
    with (EMOJI_RUN.parent / "bench-emoji.log").open("w") as log:
        subprocess.run([sys.executable, "-m", "ldmkit", "run", str(EMOJI_CONFIG), "--set",
                        f"run_dir={EMOJI_RUN}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                       check=True)
    wall = time.perf_counter() - start
    values = eval_run(EMOJI_RUN, EMOJI_NUM, guidance=list(EMOJI_SCALES))
    rows = [{"guidance": g, **{tag: values[tag if g == 1 else guidance_tag(tag, g)]
                               for tag in QUALITY}} for g in EMOJI_SCALES]
    cfg = load_config(EMOJI_CONFIG)
    return {"wall_s": wall, "steps": cfg.train.steps, "rows": rows,
            "classifier_accuracy": values["eval/classifier_accuracy"]}


def section(results: dict) -> str:
    parts = ["## Class-conditional models (`benchmarks/conditional.py`)\n",
             f"Machine: {results['machine']}. Command: `.venv/bin/python "
             "benchmarks/conditional.py`.\n"]
    if "cost" in results:
        rows = "\n".join(f"| {name} | {f['unconditional']:.1f} ms | {f['guided']:.1f} ms | "
                         f"{f['guided'] / f['unconditional']:.2f}x |"
                         for name, f in results["cost"].items())
        worst = max(f["guided"] / f["unconditional"] for f in results["cost"].values())
        parts.append(f"""One sampling step (a denoiser call on {BATCH} latents of 4x8x8), unconditional
against class-conditional with guidance 4 (both halves in one batched forward), medians of
{ROUNDS} alternated rounds of {CALLS} calls. Target: at most 2.05x: **{'met' if worst <= 2.05
                                                                    else 'missed'}**.

| backbone | unconditional | guided (scale 4) | ratio |
|---|---|---|---|
{rows}
""")
    if "mnist" in results:
        rows = "\n".join(f"| {r['guidance']:g} | {r['eval/fd']:.2f} | {r['eval/precision']:.3f} "
                         f"| {r['eval/recall']:.3f} | {r[vm.EVAL_CLASS_ACCURACY]:.3f} |"
                         for r in results["mnist"])
        step = results["mnist"][0]["step"]
        parts.append(f"""`configs/mnist-cond.yaml` trained {MINUTES} minutes of stage 2 ({step} steps, EMA
weights) on the shared MNIST stage 1; {EVAL_NUM} samples per scale from the same noise, every class in
turn, DPM-Solver++(2M) 20 steps, against {EVAL_NUM} MNIST test images (features and classes of
the in-project classifier). Class accuracy: the share the classifier assigns to the class
asked for (chance 0.1). One run, one seed.

| guidance | FD | precision | recall | class accuracy |
|---|---|---|---|---|
{rows}
""")
    if "emoji" in results:
        e = results["emoji"]
        rows = "\n".join(f"| {r['guidance']:g} | {r['eval/fd']:.2f} | {r['eval/precision']:.3f} "
                         f"| {r['eval/recall']:.3f} | {r[vm.EVAL_CLASS_ACCURACY]:.3f} |" for r in e["rows"])
        parts.append(f"""`ldmkit run configs/emoji.yaml` as shipped (autoencoder, {e['steps']} steps of the
class-conditional UNet, sampling, report): **{e['wall_s'] / 60:.1f} minutes** on this machine. Then
`ldmkit eval --guidance` with {EMOJI_NUM} samples per scale (the run's sampler, every class in
turn) against the emoji images the in-project classifier holds out. Class accuracy: the share
the classifier assigns to the category asked for (chance 0.125); the classifier itself puts
{e['classifier_accuracy']:.1%} of the held-out real emoji in their category (objects, symbols and
activities overlap), so that is the level of a perfect model; guidance exaggerates what the
classifier keys on and passes it. One run, one seed.

| guidance | FD | precision | recall | class accuracy |
|---|---|---|---|---|
{rows}
""")
    return "\n".join(parts)


def main() -> None:
    args, results = parts_cli(__doc__, PARTS, RESULTS)
    if not args.report:
        if not DATA.is_dir() and "mnist" in args.parts:
            raise SystemExit(f"MNIST not found at {DATA}")
        results["machine"] = machine()
        if "cost" in args.parts:
            results["cost"] = step_cost()
        if "mnist" in args.parts:
            results["mnist"] = sweep()
        if "emoji" in args.parts:
            results["emoji"] = emoji()
        WORK.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2))
    body = section(results)
    print(body)
    write_section("conditional", body)


if __name__ == "__main__":
    main()
