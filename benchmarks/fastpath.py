"""What bf16 autocast, torch.compile and channels_last give on this machine (``fastpath.py``).

Run: ``.venv/bin/python benchmarks/fastpath.py [steps] [sampling]`` (both by default; about 12
minutes on 2 cores, most of it compiling; ``--report`` re-renders BENCHMARKS.md from the saved
results). ``fastpath_quality.py`` checks that the fast path trains models as good.

- ``steps``: one training step (forward, backward, AdamW) of ldmkit's demo UNet, the DiT of
  ``configs/digits-dit.yaml``, diffusers' ``UNet2DModel`` of the same size
  (``throughput.diffusers_unet``) on the demo's latents, and of the demo's autoencoder (stage 1,
  batch 64 of 32x32), under each option; every variant is its own model, and the variants
  alternate over rounds in this one process, so machine noise hits all alike. A compiled
  variant's first two steps (tracing and compiling, with an empty inductor cache) are timed
  apart. FLOPs per step are counted once (the same for every option); the share of the matmul
  peak is against the peak of the variant's precision.
- ``sampling``: 64 samples of the demo UNet with DDIM 50 steps, decoded, through
  ``ldmkit.sampling.generate.generate`` on each path; and encoding the digits into latents, fp32 vs bf16.
"""

from __future__ import annotations

import os
import tempfile

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ldmkit-bench-inductor-")

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, parts_cli, write_section  # noqa: E402
from throughput import CFG, diffusers_unet, flops, matmul_peak, params  # noqa: E402

from ldmkit.config import load_config  # noqa: E402
from ldmkit.data.latents import encode_batches  # noqa: E402
from ldmkit.data.sources import load_data  # noqa: E402
from ldmkit.data.stage1 import build_autoencoder  # noqa: E402
from ldmkit.diffusion.parameterization import Parameterization  # noqa: E402
from ldmkit.models.registry import backbone_spec, build_backbone  # noqa: E402
from ldmkit.platform.fastpath import FastPath  # noqa: E402
from ldmkit.sampling.generate import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "runs" / "bench-fastpath.json"
BATCH, SHAPE, STEPS, ROUNDS = CFG.train.batch_size, (4, 8, 8), 5, 5
OPTIONS = {"fp32": (False, False, False), "bf16": (True, False, False),
           "compile": (False, True, False), "bf16 + compile": (True, True, False),
           "channels_last": (False, False, True), "bf16 + channels_last": (True, False, True)}
PARTS = ("steps", "sampling")


def bare_step(model: torch.nn.Module, call: Callable, bf16: bool, compiled: bool,
              channels_last: bool, batch: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """One step of ``model`` (``call(net, x, t)`` runs it) under the option, on ``batch``."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    param = Parameterization()

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return call(net, x, t)

    def step() -> None:
        loss = param.loss(forward, *batch).loss if len(batch) == 3 else \
            autoencoder_loss(forward, *batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def autoencoder_loss(forward: Callable, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    recon, mean, logvar = forward(x, noise)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return (recon - x).pow(2).mean() + 1e-4 * kl


def models() -> dict[str, tuple[Callable[[], torch.nn.Module], Callable, tuple, tuple]]:
    """name -> (build, call, batch, options measured)."""
    gen = torch.Generator().manual_seed(0)
    latents = tuple(torch.randn(BATCH, *SHAPE, generator=gen) for _ in range(2))
    batch = (latents[0], torch.rand(BATCH, generator=gen), latents[1])
    dit = load_config(ROOT / "configs/digits-dit.yaml").model
    pixels = (torch.rand(64, 1, 32, 32, generator=gen) * 2 - 1, torch.randn(64, 4, 8, 8))
    conv = tuple(OPTIONS)
    plain = ("fp32", "bf16", "compile", "bf16 + compile")
    return {
        "ldmkit UNet": (lambda: build_backbone(backbone_spec(CFG.model, 4, 8)),
                        lambda net, x, t: net(x, t), batch, conv),
        "diffusers UNet2DModel": (diffusers_unet,
                                  lambda net, x, t: net(x, (t * 999).long()).sample, batch, conv),
        "ldmkit DiT": (lambda: build_backbone(backbone_spec(dit, 4, 8)),
                       lambda net, x, t: net(x, t), batch, plain),
        "ldmkit autoencoder (stage 1)": (lambda: build_autoencoder(CFG.autoencoder, 1),
                                         lambda net, x, noise: net(x, noise), pixels, plain),
    }


def seconds(step: Callable[[], None], n: int = STEPS) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def measure_steps() -> dict:
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    steps, compile_s, info = {}, {}, {}
    for name, (build, call, batch, options) in models().items():
        torch.manual_seed(0)
        model = build()
        info[name] = {"params": params(model), "flops": flops(
            bare_step(model, call, False, False, False, batch))}
        for option in options:
            torch.manual_seed(0)
            step = bare_step(build(), call, *OPTIONS[option], batch)
            start = time.perf_counter()
            step()
            step()
            compile_s[(name, option)] = time.perf_counter() - start
            steps[(name, option)] = step
            print(f"{name}, {option}: first two steps {compile_s[(name, option)]:.1f} s",
                  flush=True)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for _ in range(ROUNDS):
        for key, step in steps.items():
            times[key].append(seconds(step))
    rows = []
    for (name, option), runs in times.items():
        sec = statistics.median(runs)
        rows.append({"model": name, "option": option, "step_s": sec,
                     "first_two_s": compile_s[(name, option)], **info[name]})
    return {"peaks": peaks, "batch": BATCH, "rows": rows}


def measure_sampling() -> dict:
    """64 samples, DDIM 50, decoded; each path's first call (compiling) apart from its median."""
    torch.manual_seed(0)
    model = build_backbone(backbone_spec(CFG.model, 4, 8)).eval()
    ae = build_autoencoder(CFG.autoencoder, 1).eval()
    paths = {option: FastPath("cpu", bf16, compiled) for option, (bf16, compiled, last)
             in OPTIONS.items() if not last}
    first, times = {}, {option: [] for option in paths}

    def run(fast: FastPath) -> float:
        start = time.perf_counter()
        generate(model, ae, 1.0, CFG, 64, "ddim", 50, 0, fast=fast)
        return time.perf_counter() - start

    for option, fast in paths.items():
        first[option] = run(fast)
    for _ in range(3):
        for option, fast in paths.items():
            times[option].append(run(fast))
    data = load_data(CFG.data)
    encode = {"fp32": [], "bf16": []}
    for _ in range(3):
        for option in encode:
            start = time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16, enabled=option == "bf16"):
                for _rows, _post in encode_batches(ae, data):
                    pass
            encode[option].append(time.perf_counter() - start)
    return {"rows": [{"option": o, "first_s": first[o], "median_s": statistics.median(t)}
                     for o, t in times.items()],
            "encode": {o: statistics.median(t) for o, t in encode.items()},
            "encode_images": len(data)}


def steps_table(results: dict) -> str:
    rows, base = [], {}
    for r in results["rows"]:
        if r["option"] == "fp32":
            base[r["model"]] = r["step_s"]
    for r in results["rows"]:
        peak = results["peaks"]["bf16" if "bf16" in r["option"] else "fp32"]
        achieved = r["flops"] / r["step_s"] / 1e9
        compiling = f"{r['first_two_s']:.0f} s" if "compile" in r["option"] else "-"
        rows.append(f"| {r['model']} | {r['option']} | {r['step_s'] * 1e3:.0f} ms | "
                    f"{base[r['model']] / r['step_s']:.2f}x | {compiling} | "
                    f"{r['flops'] / 1e9:.1f} | {achieved:.0f} ({achieved / peak:.0%}) |")
    return "\n".join(rows)


def best(results: dict, model: str) -> dict:
    return min((r for r in results["rows"] if r["model"] == model), key=lambda r: r["step_s"])


def _reading(s: dict, p: dict | None) -> str:
    """What the table says about each default (``ldmkit.platform.fastpath``), in words."""
    x = {(r["model"], r["option"]): base_ratio(s, r) for r in s["rows"]}
    unet, ae, dit, hf = "ldmkit UNet", "ldmkit autoencoder (stage 1)", "ldmkit DiT", \
        "diffusers UNet2DModel"
    text = (f"What the defaults take from it: bf16 pays for the convolutional models (UNet "
            f"{x[unet, 'bf16']:.2f}x, autoencoder {x[ae, 'bf16']:.2f}x) and compiling on top "
            f"more ({x[unet, 'bf16 + compile']:.2f}x, {x[ae, 'bf16 + compile']:.2f}x), so "
            f"`precision: auto` takes bf16 on this CPU; compiling pays for long runs, and "
            f"since the inductor defect is routed around (`compile_bisect.py`) a compiled run "
            f"trains as good a model (`fastpath_quality.py`), so `compile: auto` compiles "
            f"training from its break-even. The DiT at this size: {x[dit, 'bf16']:.2f}x in bf16 "
            f"and {x[dit, 'compile']:.2f}x compiled in fp32"
            + (", so on a CPU a small DiT trains faster with `precision: fp32`. "
               if x[dit, "bf16"] < 1 else ", so bf16 pays for it too. ")
            + f"channels_last gives {x[unet, 'channels_last']:.2f}x / "
            f"{x[unet, 'bf16 + channels_last']:.2f}x (fp32 / bf16) on ldmkit's UNet and "
            f"{x[hf, 'channels_last']:.2f}x / {x[hf, 'bf16 + channels_last']:.2f}x on diffusers': "
            f"it stays off.")
    if p:
        t = {r["option"]: r for r in p["rows"]}
        saved = t["bf16"]["median_s"] - t["bf16 + compile"]["median_s"]
        text += (f" Sampling gains {t['fp32']['median_s'] / t['bf16']['median_s']:.2f}x from "
                 f"bf16; compiling saves {saved:.2f} s per 64 x 50 evaluations against "
                 f"{t['bf16 + compile']['first_s']:.0f} s to compile, so it pays from about "
                 f"{t['bf16 + compile']['first_s'] / max(saved, 1e-9) * 3200:,.0f} samples x "
                 f"evaluations.")
    return text


def base_ratio(s: dict, row: dict) -> float:
    base = next(r for r in s["rows"] if r["model"] == row["model"] and r["option"] == "fp32")
    return base["step_s"] / row["step_s"]


def section(results: dict) -> str:
    s, text = results.get("steps"), [f"""## Precision and compilation (`benchmarks/fastpath.py`)

Machine: {results['machine']}. Command: `.venv/bin/python benchmarks/fastpath.py`."""]
    if s:
        ours, theirs = best(s, "ldmkit UNet"), best(s, "diffusers UNet2DModel")
        text.append(f"""
One training step (forward, backward, AdamW), batch {s['batch']} of 4x8x8 latents (the
demo's) for the backbones, 64 images of 32x32 for the autoencoder; median of {ROUNDS} rounds
of {STEPS} steps, every variant its own model, all alternating in one process. "Compiling":
the first two steps of a compiled variant with an empty inductor cache (with the cache warm, a
later process takes about 3 s). Matmul peak measured here: {s['peaks']['fp32']:.0f} GFLOP/s
fp32, {s['peaks']['bf16']:.0f} GFLOP/s bf16 (2048^2); the share is of the variant's precision.

| model | option | step | vs fp32 | compiling | GFLOP per step | GFLOP/s (of peak) |
|---|---|---|---|---|---|---|
{steps_table(s)}

With their best options, ldmkit's UNet ({ours['option']}, {ours['step_s'] * 1e3:.0f} ms)
trains {theirs['step_s'] / ours['step_s']:.2f}x as fast as diffusers' UNet2DModel
({theirs['option']}, {theirs['step_s'] * 1e3:.0f} ms).""")
    if results.get("sampling"):
        p = results["sampling"]
        rows = "\n".join(f"| {r['option']} | {r['median_s']:.2f} s | {r['first_s']:.1f} s |"
                         for r in p["rows"])
        enc = p["encode"]
        text.append(f"""
Sampling: 64 samples of the demo UNet, DDIM 50 steps, decoded (`ldmkit.sampling.generate.generate`),
median of 3 alternating rounds; the first call includes compiling.

| path | 64 samples | first call |
|---|---|---|
{rows}

Encoding the {p['encode_images']} digits into latents: {enc['fp32']:.2f} s fp32,
{enc['bf16']:.2f} s bf16.""")
    if s:
        text.append("\n" + _reading(s, results.get("sampling")))
    return "\n".join(text)


def main() -> None:
    args, results = parts_cli(__doc__, PARTS, RESULTS)
    if not args.report:
        results["machine"] = machine()
        for part in args.parts:
            results[part] = measure_steps() if part == "steps" else measure_sampling()
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2))
    body = section(results)
    print(body)
    write_section("fastpath", body)


if __name__ == "__main__":
    main()
