"""Does the fast path (``precision: auto``, ``compile: auto``) train models as good as fp32?

Run: ``.venv/bin/python benchmarks/fastpath_quality.py [mnist] [demo]`` (both by default; about
50 minutes on 2 cores; ``mnist`` needs ``../shared/data/mnist``; ``--report`` re-renders
BENCHMARKS.md from the saved results). Every run is a subprocess, one after the other.

- ``mnist``: ``configs/mnist.yaml``'s stage 2 on the shared stage 1 (``_mnist.py``), every
  run the same number of steps (``mnist``'s docstring): bf16 eager and bf16 compiled (auto's
  path once compiling was proven right, ``compile_bisect.py``), seeds 0 and 1 of each, each
  compiled run with an empty inductor cache. Each final EMA model samples ``EVAL_NUM`` images
  from the same noise with DPM-Solver++(2M) 20 steps on the auto sampling path, scored with
  ``ldmkit.sampling.evaluate.quality_metrics``. Compiled trains as well when its mean FD is
  within the seed-to-seed spread of eager's.
- ``demo``: ``ldmkit run configs/digits.yaml`` as ``make demo`` runs it, timed from launch,
  fp32 eager with seeds 0 and 1 and the defaults with seeds 0 and 1: wall time, the diagnosis
  and the final vital signs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mnist import CONFIG, EVAL_SEED, ROOT, WORK, config, reference, stage1, train_for  # noqa: E402
from report import machine, parts_cli, write_section  # noqa: E402
from throughput import path_step  # noqa: E402

from ldmkit.config import from_dict  # noqa: E402
from ldmkit.platform.fastpath import EAGER_FP32  # noqa: E402
from ldmkit.sampling.evaluate import quality_metrics  # noqa: E402
from ldmkit.sampling.generate import generate, sampling_path  # noqa: E402
from ldmkit.sampling.trained import load_for_sampling  # noqa: E402
from ldmkit.vitals.logs.metrics_jsonl import read_metrics  # noqa: E402

EVAL_NUM = 2000
FP32 = ["train.precision=fp32", "train.compile=false"]
# auto's bf16, compiled as auto compiles training from 2300 steps (over train_for's fp32)
FAST = ["train.precision=auto", "train.compile=true"]
BF16 = ["train.precision=auto", "train.compile=false"]
# two seeds of each, alternating, so that a machine slowing down hits both paths alike
MNIST_RUNS = {"bf16, seed 0": [*BF16, "seed=0"], "bf16 + compile, seed 0": [*FAST, "seed=0"],
              "bf16, seed 1": [*BF16, "seed=1"], "bf16 + compile, seed 1": [*FAST, "seed=1"]}
# alternating, so that a machine slowing down over the runs hits both paths alike
DEMO_RUNS = {"fp32, seed 0": [*FP32, "seed=0"], "auto, seed 0": ["seed=0"],
             "fp32, seed 1": [*FP32, "seed=1"], "auto, seed 1": ["seed=1"]}
DEMO_VITALS = ("vae/psnr", "loss/total_loss", "diffusion/cos_eps_mean", "latent/z_std",
               "optimization/grad_norm", "validation_ema/loss", "final_latent_stats/std",
               "sample_diversity/pairwise_mse_mean")
QUALITY = ("eval/fd", "eval/precision", "eval/recall", "eval/class_coverage")
RESULTS = ROOT / "runs" / "bench-fastpath-quality.json"
PARTS = ("mnist", "demo")


def cold_env() -> dict[str, str]:
    """This environment with an empty inductor cache: a run compiles from scratch."""
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="ldmkit-inductor-")}


def step_seconds(sets: list[str]) -> tuple[float, float]:
    """(median seconds per training step, seconds to compile) on the path ``sets`` choose."""
    cfg = config(*sets)
    step, fast = path_step(cfg, cfg.train.steps)
    start = time.perf_counter()
    step()
    step()
    compiling = time.perf_counter() - start if fast.compile else 0.0
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(5):
            step()
        times.append((time.perf_counter() - start) / 5)
    return statistics.median(times), compiling


def mnist(minutes: float, steps: int | None = None) -> dict:
    """Every run trains the same number of steps: what fp32 eager plans for ``minutes`` from
    its measured step time. Equal steps isolate the question (does the fast path train as
    good a model?) from this machine's speed, which drifted by 50 % over one session; each
    run's wall time to finish is recorded beside it. A run directory that already holds its
    final checkpoint is scored again, not retrained. ``steps``: that number instead of the
    plan."""
    setup = stage1()
    ref = reference(setup.cfg, EVAL_NUM)
    steps = steps or int(0.9 * minutes * 60 / step_seconds(FP32)[0])
    out = {}
    for name, sets in MNIST_RUNS.items():
        run_dir = WORK / ("fastpath-" + name.replace(", ", "-").replace(" ", ""))
        final = run_dir / "checkpoints" / f"step_{steps:07d}"
        seconds = None
        if not final.is_dir():
            if run_dir.exists():
                raise SystemExit(f"{run_dir} exists without step {steps}; move it away")
            start = time.perf_counter()
            train_for(10 * minutes * 60, run_dir, CONFIG, setup.scale, steps, *sets,
                      env=cold_env())
            seconds = time.perf_counter() - start
        cfg_dict, step, model, ae, scale, _ = load_for_sampling(run_dir)
        cfg = from_dict(cfg_dict)
        paths = {"own": EAGER_FP32 if "fp32" in name else None}
        scored = {}
        for label, fast in paths.items():
            fast = fast or sampling_path(from_dict({**cfg_dict, "train": {
                **cfg_dict["train"], "precision": "auto", "compile": "auto"}}),
                torch.device("cpu"), EVAL_NUM, 20)
            samples = generate(model, ae, scale, cfg, EVAL_NUM, "dpmpp_2m", 20, EVAL_SEED,
                               fast=fast)
            scored[label] = {k: v for k, v in quality_metrics(ref, samples.images).items()
                             if k in QUALITY}
        out[name] = {"step": step, "seconds": seconds, "fastpath": fastpath_records(run_dir),
                     **scored}
        print(name, json.dumps(out[name]), flush=True)
    return out


def fastpath_records(run_dir: Path) -> list[dict]:
    path = run_dir / "fastpath.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def final_vitals(run_dir: Path) -> dict[str, float]:
    last: dict[str, float] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        if record["tag"] in DEMO_VITALS:
            last[record["tag"]] = record["value"]
    return last


def demo() -> dict:
    out = {}
    for name, sets in DEMO_RUNS.items():
        run_dir = Path(tempfile.mkdtemp(prefix="ldmkit-demo-")) / "run"
        cmd = [sys.executable, "-m", "ldmkit", "run", str(ROOT / "configs/digits.yaml"),
               "--set", f"run_dir={run_dir}"]
        for s in sets:
            cmd += ["--set", s]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=cold_env())
        seconds = time.perf_counter() - start
        diagnosis = json.loads(subprocess.run(
            [sys.executable, "-m", "ldmkit", "diagnose", str(run_dir), "--json"], check=True,
            capture_output=True, text=True).stdout)
        out[name] = {"seconds": seconds, "scenario": diagnosis["scenario"],
                     "findings": [f["code"] for f in diagnosis["findings"]],
                     "vitals": final_vitals(run_dir), "run_dir": str(run_dir),
                     "fastpath": fastpath_records(run_dir)}
        print(name, json.dumps(out[name]), flush=True)
    return out


def _mnist_reading(m: dict) -> str:
    """The table's answer in words: does the compiled path train as good a model as eager,
    within the spread between two seeds of the same path?"""
    fd = {name: r["own"]["eval/fd"] for name, r in m.items()}
    eager = [v for n, v in fd.items() if "compile" not in n]
    compiled = [v for n, v in fd.items() if "compile" in n]
    if not eager or not compiled:
        return ", ".join(f"{n}: FD {v:.2f}" for n, v in fd.items()) + "."
    spread = max(max(eager) - min(eager), max(compiled) - min(compiled))
    gap = statistics.mean(compiled) - statistics.mean(eager)
    same = abs(gap) <= spread
    return (f"bf16 eager FD {' and '.join(f'{v:.2f}' for v in eager)}, bf16 compiled "
            f"{' and '.join(f'{v:.2f}' for v in compiled)}: the compiled mean is {gap:+.2f} "
            f"from eager's, {'within' if same else 'outside'} the seed-to-seed spread "
            f"({spread:.2f}). " + ("With the inductor defect routed around (\"Why compiled "
            "training trained worse\" above), compiled training trains as good a model, so "
            "`compile: auto` compiles training where it pays."
            if same else "Compiled training still trains a worse model: `compile: auto` "
            "leaves training eager."))


def section(results: dict) -> str:
    text = [f"""## Quality on the fast path (`benchmarks/fastpath_quality.py`)

Machine: {results['machine']}. Command: `.venv/bin/python benchmarks/fastpath_quality.py`."""]
    if results.get("mnist"):
        m = results["mnist"]
        rows = []
        for name, r in m.items():
            for label in ("own", "auto path"):
                if label in r:
                    q = r[label]
                    took = f"{r['seconds'] / 60:.1f} min" if r.get("seconds") else "-"
                    rows.append(f"| {name} | {label if label != 'own' else 'its own'} | "
                                f"{r['step']} | {took} | {q['eval/fd']:.2f} | "
                                f"{q['eval/precision']:.3f} | {q['eval/recall']:.3f} | "
                                f"{q['eval/class_coverage']:.3f} |")
        text.append(f"""
MNIST, stage 2 for {next(iter(m.values()))['step']} steps each, shared stage 1, batch 128,
EMA weights, {EVAL_NUM} samples (DPM-Solver++(2M) 20 steps, the same noise) on the run's own
path; two seeds of bf16 eager and of bf16 compiled, alternating. "time": from launch to exit
(final samples), compiling (empty cache) included; the runs ran one after the other on a
machine whose speed drifts, so compare times with care (`fastpath.py` alternates steps; this
does not).

| run | sampled on | steps | time | FD | precision | recall | coverage |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{_mnist_reading(m)}""")
    if results.get("demo"):
        d = results["demo"]
        tags = [t for t in DEMO_VITALS if all(t in r["vitals"] for r in d.values())]
        head = " | ".join(f"`{t}`" for t in tags)
        demo_when = (f" Measured on {results['demo_machine']}." if results.get("demo_machine")
                     else "")
        rows = "\n".join(f"| {n} | {r['seconds'] / 60:.2f} min | {r['scenario']} | "
                         + " | ".join(f"{r['vitals'][t]:.3f}" for t in tags) + " |"
                         for n, r in d.items())
        text.append(f"""
`make demo`'s run (`ldmkit run configs/digits.yaml`), wall time from launch, each with an
empty inductor cache; the diagnosis and the final vital signs.{demo_when}

| run | time | verdict | {head} |
|---|---|---|{'---|' * len(tags)}
{rows}""")
    return "\n".join(text)


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--minutes", type=float, default=10.0)
        parser.add_argument("--steps", type=int, help="MNIST steps of every run (default: what "
                            "fp32 eager does in --minutes here)")

    args, results = parts_cli(__doc__, PARTS, RESULTS, options)
    if not args.report:
        results["machine"] = machine()
        for part in args.parts:
            if part == "mnist":
                results["minutes"] = args.minutes
                results["mnist"] = mnist(args.minutes, args.steps)
            else:
                results["demo"] = demo()
                results.pop("demo_machine", None)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2))
    body = section(results)
    print(body)
    write_section("fastpath_quality", body)


if __name__ == "__main__":
    main()
