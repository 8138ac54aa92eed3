"""The cost of ``ldmkit probe`` per checkpoint, and how it scales with its options.

Run: ``.venv/bin/python benchmarks/probe.py [cost] [scaling]`` (both by default; ``--report``
re-renders BENCHMARKS.md from the saved results).

- ``cost``: the tiny pipelines of the tests (``tests/tiny_pipelines.py``: SD 1.x-like, SDXL-like,
  SD3-like, Flux-like; 16 x 16 images, random weights) with the probe's default options (200
  points on 64 training and 32 held-out digits, 4 prompts x 4 seeds x 20 steps at the family's
  default guidance): the network evaluations per checkpoint and the seconds of its validation
  and its sampling (medians of ``ROUNDS``), the one-off setup (loading, encoding the images,
  the copy reference), and for SD putting a LoRA on and taking it off.
- ``scaling``: the SD-like pipeline's seconds per checkpoint as ``--points``, ``--prompts`` x
  ``--seeds`` and ``--steps`` change, each alone.

A real pipeline's evaluation costs what its denoiser costs at its resolution; the counts carry
over, the seconds do not.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import tiny_pipelines as tp  # noqa: E402
from _mnist import WORK  # noqa: E402
from report import machine, parts_cli, write_section  # noqa: E402

from ldmkit.probe import measure  # noqa: E402
from ldmkit.probe.apply import applied  # noqa: E402
from ldmkit.probe.checkpoints import find_series  # noqa: E402
from ldmkit.probe.pipelines import DEFAULT_GUIDANCE, load_base  # noqa: E402
from ldmkit.probe.run import ProbeOptions, _images, cost  # noqa: E402

RESULTS = WORK / "probe.json"
ROUNDS = 3
FAMILIES = ("sd", "sdxl", "sd3", "flux")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_checkpoint(family, train, held, options: ProbeOptions) -> dict[str, float]:
    """Median seconds of one checkpoint's validation and sampling under ``options``."""
    guidance = options.guidance or DEFAULT_GUIDANCE[family.name]
    pset = measure.draw(options.points, options.prompts, options.seeds,
                        tuple(train.latents.shape[1:]), 0)
    prompts = sorted(set(train.captions))[:options.prompts]
    noop = lambda _: None  # noqa: E731
    validation, sampling = [], []
    for _ in range(ROUNDS):
        validation.append(timed(lambda: measure.validation_vitals(
            family, train, held, pset, options.batch, guidance, noop)))
        sampling.append(timed(lambda: measure.sample_vitals(
            family, prompts, pset, options.steps, guidance, options.batch, None, noop)))
    evals = cost(family, options, len(prompts), guidance, held is not None)
    return {"validation_s": statistics.median(validation), "sampling_s":
            statistics.median(sampling), "validation_evals": evals[0], "sampling_evals": evals[1]}


def setup(kind: str, root: Path):
    data = tp.captioned_digits(root / "data", 64)
    hold = tp.captioned_digits(root / "hold", 32, offset=500)
    base = tp.save_pipeline(kind, tp.folder_images(data), root / kind)
    options = ProbeOptions()
    start = time.perf_counter()
    family = load_base(base, torch.device("cpu"), torch.float32)
    family.at_resolution(tp.SIZE)
    train = _images(family, data, options, tp.SIZE)
    held = _images(family, hold, options, tp.SIZE)
    measure.copy_reference(family, train, options.batch)
    return family, train, held, time.perf_counter() - start, base, data


def lora_swap(base: Path, data: Path, root: Path, family) -> float:
    folders = tp.lora_series(base, data, root / "lora", [5])
    checkpoint = find_series([folders["peft"]])[0]

    def swap():
        with applied(family, checkpoint):
            pass

    swap()
    return statistics.median(timed(swap) for _ in range(5))


def measure_cost() -> dict:
    results = {}
    for kind in FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            family, train, held, setup_s, base, data = setup(kind, Path(tmp))
            results[kind] = per_checkpoint(family, train, held, ProbeOptions()) | {
                "setup_s": setup_s, "pipeline": type(family.pipe).__name__}
            if kind == "sd":
                results[kind]["lora_swap_s"] = lora_swap(base, data, Path(tmp), family)
        print(kind, results[kind], flush=True)
    return results


SCALING = (("points", {"points": 100}), ("points", {"points": 400}),
           ("prompts x seeds", {"prompts": 2, "seeds": 2}),
           ("prompts x seeds", {"prompts": 8, "seeds": 4}), ("steps", {"steps": 10}),
           ("steps", {"steps": 40}))


def measure_scaling() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        family, train, held, _, _, _ = setup("sd", Path(tmp))
        for what, changes in (("defaults", {}), *SCALING):
            options = ProbeOptions(**changes)
            rows.append({"what": what, "options": changes} | per_checkpoint(family, train, held,
                                                                             options))
            print(rows[-1], flush=True)
    return rows


def render(results: dict) -> str:
    lines = ["## The probe's cost per checkpoint (`benchmarks/probe.py`)", "",
             f"`.venv/bin/python benchmarks/probe.py`; {results.get('machine', '')}. The tests' "
             f"tiny pipelines ({tp.SIZE} x {tp.SIZE} images, random weights), fp32 on the CPU, "
             "batch 8, with held-out images; medians of 3.", ""]
    if "cost" in results:
        lines += ["Defaults: 200 points on the held-out and on the training images, 4 prompts x "
                  "4 seeds x 20 steps at the family's guidance (CFG doubles SD's, SDXL's and "
                  "SD3's sampling evaluations; Flux's guidance is an embedding).", "",
                  "| pipeline | evaluations per checkpoint (validation + sampling) | validation "
                  "s | sampling s | per checkpoint s | one-off setup s |", "|---|---|---|---|---|---|"]
        for row in results["cost"].values():
            lines.append(f"| {row['pipeline']} | {row['validation_evals']} + "
                         f"{row['sampling_evals']} | {row['validation_s']:.2f} | "
                         f"{row['sampling_s']:.2f} | {row['validation_s'] + row['sampling_s']:.2f}"
                         f" | {row['setup_s']:.2f} |")
        swap = results["cost"].get("sd", {}).get("lora_swap_s")
        if swap is not None:
            lines += ["", f"Putting a LoRA (all attention, feed-forward and resnet layers, rank 8) "
                      f"on the SD-like base and taking it off: {swap:.3f} s."]
    if "scaling" in results:
        lines += ["", "SD-like pipeline, one option changed at a time (the rest the defaults):",
                  "", "| changed | evaluations | validation s | sampling s |", "|---|---|---|---|"]
        for row in results["scaling"]:
            changed = ", ".join(f"--{k} {v}" for k, v in row["options"].items()) or "defaults"
            lines.append(f"| {changed} | {row['validation_evals']} + {row['sampling_evals']} | "
                         f"{row['validation_s']:.2f} | {row['sampling_s']:.2f} |")
        lines += ["", "Validation grows with `--points` and sampling with `--prompts` x "
                  "`--seeds` x `--steps`, about in proportion to the evaluation counts (a small "
                  "fixed part per call: encoding the captions, decoding the samples)."]
    return "\n".join(lines)


def main() -> None:
    args, results = parts_cli(__doc__, ("cost", "scaling"), RESULTS)
    if not args.report:
        torch.set_num_threads(2)
        if "cost" in args.parts:
            results["cost"] = measure_cost()
        if "scaling" in args.parts:
            results["scaling"] = measure_scaling()
        results["machine"] = machine()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
    write_section("probe", render(results))


if __name__ == "__main__":
    main()
