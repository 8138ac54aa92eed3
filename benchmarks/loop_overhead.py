"""What the real training loop costs beyond the bare step, and what a validation costs.

Run: ``.venv/bin/python benchmarks/loop_overhead.py`` (about 8 minutes on 2 cores, alone;
needs the shared MNIST stage 1 of ``_mnist.py``). ``--report`` re-renders BENCHMARKS.md.

``configs/mnist.yaml``'s stage 2 (the demo UNet, batch 128) through ``ldmkit.training.loop.train``
for ``STEPS`` steps with every vital sign on, logging every 50 steps and validating every 200,
no sampling or checkpoints in between, on the auto fast path (bf16), eager and compiled. A
callback stamps the time at each step; a step's time is from the previous stamp, so it holds
all the loop does for it (the batch draw, the step and its vitals, the guard, the EMA, the
callbacks). Against it, the bare step (``throughput.step_fn``: forward, backward, AdamW on one
fixed batch, nothing else) of the same network on the same path, timed by the same callback
every ``BARE_EVERY`` steps between two loop steps: this machine's speed drifts by tens of
percent within minutes, so only interleaved timings compare. Target: the loop's mean step
between log intervals (log steps included, validation steps not) within 5 % of the bare
step's mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mnist import ROOT, STAGE1, config, stage1  # noqa: E402
from report import machine, write_section  # noqa: E402
from throughput import heaviest, path_step  # noqa: E402

from ldmkit.training.callbacks import CONTINUE, Callback, Decision, StepEvent  # noqa: E402
from ldmkit.training.loop import train  # noqa: E402
from ldmkit.training.state import LoopState  # noqa: E402

RESULTS = ROOT / "runs" / "bench-loop-overhead.json"
STEPS, LOG_EVERY, VAL_EVERY, WARM = 500, 50, 200, 20
BARE_EVERY = 5
PROFILED = range(310, 320)  # steps 311 to 320: no log or validation step among them
PATHS = {"bf16 eager": "false", "bf16 compiled": "true"}


class Stamps(Callback):
    """The wall time at each step's end (the last callback), and every ``BARE_EVERY`` plain
    steps one bare step timed between two loop steps (left out of both), so that the two are
    measured in the same minutes of a machine whose speed drifts by tens of percent; with
    ``profile``, torch profiler's heaviest operators over the steps ``PROFILED`` (printed)."""

    def __init__(self, bare: Callable[[], None], profile: bool = False) -> None:
        self.at: dict[int, float] = {}  # when the loop was done with each step
        self.resumed: dict[int, float] = {}  # when the loop went on after it (bare step out)
        self.bare, self.bare_s = bare, []
        self.profile = profile
        self.profiler: torch.profiler.profile | None = None

    def on_step(self, event: StepEvent, state: LoopState) -> Decision:
        self.at[event.step] = time.perf_counter()
        if event.step % BARE_EVERY == 0 and event.step % LOG_EVERY and event.step not in PROFILED:
            self.bare()
            self.bare_s.append(time.perf_counter() - self.at[event.step])
        if self.profile and event.step == PROFILED.start:
            self.profiler = torch.profiler.profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()
        elif self.profiler is not None and event.step == PROFILED.stop:
            self.profiler.__exit__(None, None, None)
            print(f"== the loop, steps {PROFILED.start + 1} to {PROFILED.stop}")
            print(self.profiler.key_averages().table(sort_by="self_cpu_time_total",
                                                     row_limit=20))
            self.profiler = None
        self.resumed[event.step] = time.perf_counter()
        return CONTINUE


def bare_step(compile: str, profile: bool = False) -> Callable[[], None]:
    """The bare step on the path the run takes, warmed up (compiled, if so)."""
    step, _ = path_step(config("train.precision=auto", f"train.compile={compile}"), STEPS)
    for _ in range(3):
        step()
    if profile:
        print(f"== the bare step, {len(PROFILED)} steps")
        print(heaviest(step, len(PROFILED), 20))
    return step


def loop(compile: str, profile: bool = False) -> dict:
    """One run's step times, split into plain, log and validation steps."""
    setup = stage1()
    stamps = Stamps(bare_step(compile, profile), profile)
    run_dir = Path(tempfile.mkdtemp(prefix="ldmkit-loop-")) / "run"
    cfg = config(f"run_dir={run_dir}", f"autoencoder.pretrained={STAGE1}",
                 f"diffusion.latent_scale_factor={setup.scale}", f"train.steps={STEPS}",
                 f"train.log_every={LOG_EVERY}", f"train.val_every={VAL_EVERY}",
                 "train.sample_every=100000", f"train.checkpoint_every={STEPS}",
                 "train.eval_every=0", "train.precision=auto", f"train.compile={compile}")
    train(cfg, run_dir, callbacks=[stamps])
    ms = {s: (stamps.at[s] - stamps.resumed[s - 1]) * 1e3 for s in stamps.at
          if s - 1 in stamps.resumed}
    judged = {s: v for s, v in ms.items() if s > WARM and s < STEPS}
    validation = [v for s, v in judged.items() if s % VAL_EVERY == 0]
    logs = [v for s, v in judged.items() if s % LOG_EVERY == 0 and s % VAL_EVERY]
    plain = [v for s, v in judged.items() if s % LOG_EVERY]
    interval = statistics.mean(plain + logs)
    bare_mean = statistics.mean(stamps.bare_s) * 1e3
    bare = statistics.median(stamps.bare_s) * 1e3
    return {"bare_ms": bare, "bare_mean_ms": statistics.mean(stamps.bare_s) * 1e3,
            "plain_median_ms": statistics.median(plain), "plain_mean_ms": statistics.mean(plain),
            "log_step_ms": statistics.median(logs), "interval_mean_ms": interval,
            "validation_s": statistics.median(validation) / 1e3,
            "overhead": interval / bare_mean - 1,
            "step_ms": {str(s): round(v, 2) for s, v in ms.items()}}


def render(results: dict) -> str:
    rows = "\n".join(
        f"| {name} | {r['bare_ms']:.1f} / {r['bare_mean_ms']:.1f} ms | "
        f"{r['plain_median_ms']:.1f} / {r['plain_mean_ms']:.1f} ms | "
        f"{r['log_step_ms']:.0f} ms | {r['interval_mean_ms']:.1f} ms | {r['overhead']:+.1%} "
        f"({'met' if r['overhead'] <= 0.05 else 'missed'}) | {r['validation_s']:.2f} s |"
        for name, r in results["paths"].items())
    added = ", ".join(f"{r['interval_mean_ms'] - r['bare_mean_ms']:.1f} ms ({name})"
                      for name, r in results["paths"].items())
    reading = (f"The loop adds {added} a step: the gradient clipping, the EMA update, the "
               "per-step vital signs and the batch draw, none of which the bare step has; the "
               "same milliseconds weigh more against the faster compiled step. A validation "
               "(the model and its EMA at the fixed points) costs the \"validation\" column "
               "once every val_every steps.")
    return f"""## The loop's overhead (`benchmarks/loop_overhead.py`)

Machine: {results['machine']}. Command: `.venv/bin/python benchmarks/loop_overhead.py`.

`configs/mnist.yaml`'s stage 2 (demo UNet, batch 128) in `ldmkit.training.loop.train` for
{STEPS} steps, every vital sign on, logging every {LOG_EVERY} steps, validating every
{VAL_EVERY}; a step's time is all the loop does for it. "bare": forward, backward and AdamW of
the same network on one fixed batch, one timed every {BARE_EVERY} steps between two loop steps
(the machine's speed drifts within minutes). "loop step": steps that log nothing; "interval
mean": the loop's mean step between log intervals, log steps included, validation steps not
(target: within 5 % of the bare step's mean). The first {WARM} steps (and the compile) are
left out.

| path | bare, median / mean | loop, median / mean | log step | interval mean | vs bare | validation |
|---|---|---|---|---|---|---|
{rows}

{reading}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="print torch profiler's heaviest operators of loop and bare steps")
    parser.add_argument("--only", choices=sorted(PATHS), help="measure this path only")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not args.report:
        results = {"machine": machine(), "paths": results.get("paths", {})}
        for name, compile in PATHS.items():
            if args.only and name != args.only:
                continue
            results["paths"][name] = loop(compile, args.profile)
            print(name, json.dumps(results["paths"][name]), flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
    write_section("loop_overhead", render(results))


if __name__ == "__main__":
    main()
