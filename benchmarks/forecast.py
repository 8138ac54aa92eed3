"""Divergence forecast and repair rate (issue 30): how far ahead ``divergence_ahead`` comes,
how often it cries wolf, what it costs, and how many sick runs end healthy with no human.

Run: ``.venv/bin/python benchmarks/forecast.py`` (needs ``../shared/data/fashion-mnist``;
about 45 minutes on 2 cores; ``--runs 6`` for a smoke run). Everything trains in this process,
one run after the other, on one stage 1 per dataset (digits, Fashion-MNIST, 8192 images).

1. **Forecast sweep.** ``--runs`` configurations drawn with a fixed seed: digits or
   Fashion-MNIST, the UNet or a small DiT, eps, v or flow, a learning rate log-uniform in
   [3e-3, 5], warm-up 0 to 500 steps, clipping at 1 or off; then ``--diverging`` more with
   rates in [0.3, 5], where most diverge; 400 steps, logged every 10. A run
   diverges at its first non-finite step (``vitals.on_nonfinite: stop`` ends it) or its first
   gradient norm above 100 (the recorder below ends it). A diverging run counts as warned
   when ``divergence_ahead`` came at least 2 log intervals (20 steps) before.
2. **Healthy configs.** Every config under ``configs/``, shortened to 600 steps: any
   ``divergence_ahead`` is a false warning. The forecast's own time (``Forecast.on_step``)
   against the loop's is its overhead.
3. **Repair rate.** The first draw's sick runs (diverged or warned) again with
   ``vitals.on_warning`` / ``on_critical: repair`` and
   ``on_nonfinite: rollback``, through the job's repair (``jobs.fix.repair``, as ``ldmkit
   train`` does); plus digits runs started sick in each way the rules know. Counted: runs that
   end healthy, diverging runs that never had a non-finite step, and each repaired run's FD
   (in-loop eval at the last step) against the same backbone and objective trained at the
   config's learning rate.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

from ldmkit.config import Config, load_config  # noqa: E402
from ldmkit.jobs.fix import repair  # noqa: E402
from ldmkit.run.layout import RunDir  # noqa: E402
from ldmkit.training import forecasting  # noqa: E402
from ldmkit.training.callbacks import CONTINUE, Callback, Decision, StepEvent  # noqa: E402
from ldmkit.training.loop import TrainResult, train  # noqa: E402
from ldmkit.training.state import LoopState  # noqa: E402
from ldmkit.vitals import metrics as vm  # noqa: E402
from ldmkit.vitals.forecast import exploding  # noqa: E402
from ldmkit.vitals.logs.metrics_jsonl import json_objects, read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs/bench-forecast"
FASHION = ROOT.parent / "shared/data/fashion-mnist"
STEPS, LOG_EVERY, LEAD = 400, 10, 2  # the target: warned LEAD log intervals ahead
DIT = "model={type: dit, patch_size: 2, hidden_size: 64, depth: 4, num_heads: 2}"
DATASETS = {"digits": [], "fashion": ["data.source=idx", f"data.path={FASHION}",
                                      "data.limit=8192"]}
BASE = [f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}", "train.batch_size=32",
        "train.sample_every=100000", "train.checkpoint_every=50", "train.val_every=0",
        "sample.num=16", "sample.steps=10", "model.base_channels=16", "tensorboard=false"]


@dataclass
class Recorder(Callback):
    """Where a run first diverges by the gradient norm, and the loop's wall time; with
    ``abort`` the run ends there (the sweep needs no more of it)."""

    abort: bool = True
    diverged_at: int | None = None
    first: float = 0.0
    last: float = 0.0

    def on_step(self, event: StepEvent, state: LoopState) -> Decision:
        self.last = time.perf_counter()
        self.first = self.first or self.last
        if self.diverged_at is None and exploding(float(event.vitals[vm.GRAD_NORM]), 100.0):
            self.diverged_at = event.step
            if self.abort:
                return Decision("abort")
        return CONTINUE


@dataclass
class Timed:
    """Time spent inside ``Forecast.on_step`` (the forecast's overhead)."""

    seconds: float = 0.0
    original: object = field(default=forecasting.Forecast.on_step)

    def __enter__(self) -> Timed:
        def timed(callback, event, state):
            start = time.perf_counter()
            try:
                return self.original(callback, event, state)
            finally:
                self.seconds += time.perf_counter() - start
        forecasting.Forecast.on_step = timed
        return self

    def __exit__(self, *exc: object) -> None:
        forecasting.Forecast.on_step = self.original


def stage1(dataset: str) -> Path:
    """The dataset's autoencoder and latent cache, trained once."""
    path = WORK / f"stage1-{dataset}"
    if not (path / "autoencoder").exists():
        train(config(dataset, "train.steps=1", "autoencoder.steps=300", f"run_dir={path}"), path)
    return path


def config(dataset: str, *sets: str) -> Config:
    return load_config(ROOT / "configs/digits.yaml", [
        *BASE, *DATASETS[dataset], f"data.latent_cache={WORK / ('cache-' + dataset)}", *sets])


def draw(count: int, seed: int = 30, low: float = 3e-3, prefix: str = "r") -> list[dict]:
    """``count`` configurations, learning rates log-uniform in [``low``, 5]."""
    rng = random.Random(seed)
    runs = []
    for i in range(count):
        backbone, objective = rng.choice(["unet", "unet", "dit"]), rng.choice(["eps", "v", "flow"])
        runs.append({"name": f"{prefix}{i:02d}", "dataset": rng.choice(list(DATASETS)),
                     "backbone": backbone, "objective": objective,
                     "lr": float(f"{math.exp(rng.uniform(math.log(low), math.log(5))):.3g}"),
                     "warmup": rng.choice([0, 50, 150, 300, 500]),
                     "clip": rng.choice([1.0, 1e9])})
    return runs


def model_sets(backbone: str, objective: str) -> list[str]:
    sets = [DIT] if backbone == "dit" else []
    if objective == "flow":
        sets += ["diffusion.objective=flow", "diffusion.schedule=linear"]
    elif objective == "v":
        sets.append("diffusion.objective=v")
    return sets


def sweep_sets(run: dict) -> list[str]:
    return [f"autoencoder.pretrained={stage1(run['dataset'])}", f"train.lr={run['lr']}",
            f"train.warmup_steps={run['warmup']}", f"train.grad_clip={run['clip']}",
            *model_sets(run["backbone"], run["objective"])]


def raised(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).findings
    return [e for e in json_objects(path) if e.get("event") == "raised"] if path.is_file() else []


def trained(*args: object, **kwargs: object) -> TrainResult:
    """``train``, ending the benchmark at a SIGTERM or SIGINT (which ``train`` takes as a stop
    request for its run, with a checkpoint)."""
    result = train(*args, **kwargs)
    if result.preempted_by:
        raise SystemExit(f"stopped by {result.preempted_by}; rerun to go on where it stopped")
    return result


def forecast_run(run: dict) -> dict:
    run_dir = WORK / "sweep" / run["name"]
    recorder = Recorder()
    result = trained(config(run["dataset"], *sweep_sets(run), "vitals.on_nonfinite=stop",
                          f"run_dir={run_dir}"), run_dir, callbacks=[recorder])
    bad = [result.stopped_by.step] if result.stopped_by and \
        result.stopped_by.code.startswith("nonfinite") else []
    diverged = min([*bad, *([recorder.diverged_at] if recorder.diverged_at else [])],
                   default=None)
    warned = next((e["step"] for e in raised(run_dir) if e["code"] == "divergence_ahead"), None)
    return {**run, "diverged": diverged, "warned": warned}


def healthy_run(path: Path) -> dict:
    cfg = load_config(path)
    name = path.stem
    run_dir = WORK / "healthy" / name
    recorder = Recorder(abort=False)
    sets = [f"train.steps={min(cfg.train.steps, 600)}", "train.sample_every=100000",
            f"autoencoder.steps={min(cfg.autoencoder.steps, 400)}",
            "train.eval_every=0", "sample.num=16", "sample.steps=10", f"run_dir={run_dir}",
            "tensorboard=false"]
    if cfg.data.path:
        sets.append(f"data.path={ROOT / cfg.data.path}")
    if cfg.data.source == "idx":
        sets.append("data.limit=8192")
    with Timed() as timed:
        trained(load_config(path, sets), run_dir, callbacks=[recorder])
    warned = [e["step"] for e in raised(run_dir) if e["code"] == "divergence_ahead"]
    return {"config": name, "warned": warned, "overhead": timed.seconds /
            max(recorder.last - recorder.first, 1e-9), "diverged": recorder.diverged_at}


def repair_run(name: str, dataset: str, sets: list[str], evaluate: bool) -> dict:
    run_dir = WORK / "repair" / name
    cfg = config(dataset, *sets, "vitals.on_warning=repair", "vitals.on_critical=repair",
                 "vitals.on_nonfinite=rollback", f"run_dir={run_dir}",
                 *([f"train.eval_every={STEPS}"] if evaluate else []))
    result = repair(trained(cfg, run_dir), cfg)
    nonfinite = sum(e["code"].startswith("nonfinite") for e in raised(run_dir))
    fd = [r["value"] for r in read_metrics(RunDir(result.run_dir).metrics)
          if r.get("tag") == vm.EVAL_FD]
    return {"name": name, "healthy": result.scenario == "healthy", "scenario": result.scenario,
            "nonfinite_events": nonfinite, "repairs": len(RunDir(run_dir).change_records()),
            "fd": fd[-1] if fd else None, "run": str(result.run_dir)}


def sick_starts(scale: float) -> dict[str, list[str]]:
    """Digits runs started wrong in each way the rules know (and a fix can undo)."""
    digits = f"autoencoder.pretrained={stage1('digits')}"
    labels = ["model.num_classes=10"]
    return {"scale x8": [digits, f"diffusion.latent_scale_factor={scale * 8:.4g}"],
            "scale /8": [digits, f"diffusion.latent_scale_factor={scale / 8:.4g}"],
            "t biased": [digits, "diffusion.t_sampling=logit_normal",
                         "diffusion.logit_normal_loc=2.5"],
            "lr 1e-7": [digits, "train.lr=1e-7"],
            "labels always dropped": [digits, *labels, "train.cond_drop_prob=1.0"],
            "guidance without null class": [digits, *labels, "train.cond_drop_prob=0.0",
                                            "sample.guidance_scale=3.0"]}


def _fd(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def summary(forecasts: list[dict], healthy: list[dict], repairs: list[dict],
            sick: list[dict], twins: dict[str, float]) -> str:
    diverging = [r for r in forecasts if r["diverged"]]
    ahead = [r for r in diverging
             if r["warned"] and r["diverged"] - r["warned"] >= LEAD * LOG_EVERY]
    leads = [r["diverged"] - r["warned"] for r in diverging if r["warned"]
             and r["warned"] < r["diverged"]]
    calm = [r for r in forecasts if not r["diverged"]]
    late = [r for r in diverging if r["diverged"] > LEAD * LOG_EVERY]
    by_name = {r["name"]: r for r in forecasts}
    rep_div = [r for r in repairs if by_name[r["name"]]["diverged"]]
    never_nan = [r for r in rep_div if r["nonfinite_events"] == 0]
    all_rep = repairs + sick
    repaired = {r["name"]: r for r in repairs}

    def repair_cells(r: dict) -> str:
        rep = repaired.get(r["name"])
        if rep is None:
            return "- | - | -"
        twin = twins.get(r["dataset"] + r["backbone"] + r["objective"])
        return f"{rep['scenario']} | {rep['nonfinite_events']} | {_fd(rep['fd'])} / {_fd(twin)}"

    rows = "\n".join(
        f"| {r['name']} | {r['dataset']} | {r['backbone']} | {r['objective']} | {r['lr']:g} | "
        f"{r['warmup']} | {'1' if r['clip'] == 1.0 else 'off'} | {r['diverged'] or '-'} | "
        f"{r['warned'] or '-'} | {repair_cells(r)} |" for r in forecasts)
    sick_rows = "\n".join(f"| {r['name']} | {r['scenario']} | {r['repairs']} |" for r in sick)
    healthy_rows = "\n".join(f"| {h['config']} | {len(h['warned'])} | {h['overhead']:.3%} |"
                             for h in healthy)
    def share(part: int, whole: int) -> str:
        return f"{part} of {whole} ({part / max(whole, 1):.0%})"

    figures = [
        (f"diverging runs warned >= {LEAD} log intervals before the first non-finite step or "
         "grad norm > 100", ">= 80 %", share(len(ahead), len(diverging))),
        (f"the same, of runs diverging after step {LEAD * LOG_EVERY} (a warning can be in "
         "time)", "", share(sum(r in ahead for r in late), len(late))),
        ("median lead (steps)", "", str(statistics.median(leads)) if leads else "-"),
        ("false warnings on the healthy configs", "0",
         f"{sum(len(h['warned']) for h in healthy)} on {len(healthy)} configs"),
        ("sweep runs that did not diverge yet were warned", "",
         share(sum(bool(r["warned"]) for r in calm), len(calm))),
        ("forecast overhead per step (its time / the loop's), at most", "<= 0.5 %",
         f"{max(h['overhead'] for h in healthy):.3%}"),
        ("sick runs (diverged or warned in the sweep, or started sick) ending healthy with no "
         "human", ">= 90 %",
         share(sum(r["healthy"] for r in all_rep), len(all_rep))),
        ("diverging runs that never had a non-finite step", ">= 80 %",
         share(len(never_nan), len(rep_div)))]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in figures)
    header = ("| run | data | backbone | objective | lr | warm-up | clip | diverged | warned "
              "| repaired verdict | non-finite | FD / healthy twin |")
    return f"""
## Divergence forecast and repair rate (`benchmarks/forecast.py`)

{machine()}. {len(forecasts)} sweep runs ({STEPS} steps, logged every {LOG_EVERY}), digits
and Fashion-MNIST, UNet and a small DiT, eps / v / flow, learning rates 3e-3 to 5, warm-up 0
to 500, clipping on and off.

| figure | target | measured |
|---|---|---|
{table}

Per run (diverged / warned: step; repair: the final verdict, non-finite events, FD of the
repaired run / of the same backbone and objective at the config's learning rate):

{header}
|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}

Runs started sick (digits, UNet), with `on_warning` / `on_critical: repair`:

| start | final verdict | changes made |
|---|---|---|
{sick_rows}

Healthy configs (600 steps at most):

| config | divergence_ahead | forecast overhead |
|---|---|---|
{healthy_rows}
"""


def measured(part: str, keys: list[str], measure) -> list[dict]:
    """``measure(key)`` for each key, each result kept in ``WORK/results-PART.json`` as it comes:
    an interrupted benchmark goes on where it stopped."""
    path = WORK / f"results-{part}.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    for key in keys:
        if key not in done:
            done[key] = measure(key)
            path.write_text(json.dumps(done, indent=1))
    return [done[key] for key in keys]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=44)
    parser.add_argument("--diverging", type=int, default=30,
                        help="more runs at learning rates of 0.3 to 5, most of which diverge")
    parser.add_argument("--smoke", action="store_true", help="one healthy config, one sick")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    runs = {run["name"]: run for run in
            draw(args.runs) + draw(args.diverging, seed=31, low=0.3, prefix="d")}
    forecasts = measured("forecast", list(runs), lambda name: forecast_run(runs[name]))
    configs = {path.stem: path for path in sorted((ROOT / "configs").glob("*.yaml"))}
    healthy = measured("healthy", ["digits"] if args.smoke else list(configs),
                       lambda name: healthy_run(configs[name]))
    twin_sets = {}
    for run in runs.values():
        lr = "5e-4" if run["backbone"] == "dit" else "1e-3"
        twin_sets.setdefault(f"twin-{run['dataset']}{run['backbone']}{run['objective']}", (
            run["dataset"], [f"autoencoder.pretrained={stage1(run['dataset'])}",
                             f"train.lr={lr}", "train.warmup_steps=100",
                             *model_sets(run["backbone"], run["objective"])]))
    twin_runs = measured("twins", list(twin_sets),
                         lambda name: repair_run(name, *twin_sets[name], True))
    twins = {name[5:]: r["fd"] if r["fd"] is not None else math.nan
             for name, r in zip(twin_sets, twin_runs, strict=True)}
    # the first draw's (the whole range of rates): the second adds diverging runs only
    sick_runs = [r["name"] for r in forecasts[:args.runs] if r["diverged"] or r["warned"]]
    repairs = measured("repair", sick_runs, lambda name: repair_run(
        name, runs[name]["dataset"], sweep_sets(runs[name]), True))
    scale = train(config("digits", f"autoencoder.pretrained={stage1('digits')}",
                         "train.steps=1", f"run_dir={WORK / 'scale'}"),
                  WORK / "scale").latent_scale_factor
    starts = dict(list(sick_starts(scale).items())[:1 if args.smoke else None])
    sick = measured("sick", list(starts), lambda name: repair_run(
        name.replace(" ", "-"), "digits", starts[name], False) | {"name": name})
    write_section("forecast", summary(forecasts, healthy, repairs, sick, twins))


if __name__ == "__main__":
    main()
