"""Sampler quality vs cost on MNIST: FD and wall time of DDPM, DDIM and DPM-Solver++(2M).

Run: ``.venv/bin/python benchmarks/sampler_quality.py`` after ``benchmarks/time_to_quality.py``,
whose 20-minute ldmkit run (``runs/bench-mnist/ldmkit``) it samples with its EMA weights (about
10 minutes on 2 cores, most of it DDPM's 1000 steps). Every sampler starts from the same noise;
images are decoded by the run's autoencoder and scored against MNIST test images with the
in-project classifier's features.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mnist import EVAL_SEED, LDMKIT_20MIN, WORK, config, reference  # noqa: E402
from report import machine, write_section  # noqa: E402

from ldmkit.config import from_dict  # noqa: E402
from ldmkit.errors import CheckpointError  # noqa: E402
from ldmkit.sampling.evaluate import quality_metrics  # noqa: E402
from ldmkit.sampling.generate import generate  # noqa: E402
from ldmkit.sampling.trained import load_for_sampling  # noqa: E402

SAMPLERS = (("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("dpmpp_2m", 20), ("dpmpp_2m", 10))
NUM, REAL = 1000, 2000
RESULTS = WORK / "sampler_quality.json"


def main() -> None:
    try:
        cfg_dict, step, model, ae, scale, _ = load_for_sampling(LDMKIT_20MIN)
    except CheckpointError as exc:
        raise SystemExit(f"{exc} (run benchmarks/time_to_quality.py first)") from None
    cfg = from_dict(cfg_dict)
    ref = reference(config(), REAL)
    rows = []
    for sampler, steps in SAMPLERS:
        start = time.perf_counter()
        samples = generate(model, ae, scale, cfg, NUM, sampler, steps, EVAL_SEED)
        seconds = time.perf_counter() - start
        values = {"sampler": sampler, "steps": steps, "seconds": seconds,
                  **quality_metrics(ref, samples.images)}
        print(json.dumps(values))
        rows.append(values)
    RESULTS.write_text(json.dumps(rows, indent=2))
    ddpm_fd = rows[0]["eval/fd"]
    dpm20 = next(r for r in rows if r["sampler"] == "dpmpp_2m" and r["steps"] == 20)
    off = dpm20["eval/fd"] / ddpm_fd - 1
    table = "\n".join(
        f"| {r['sampler']} | {r['steps']} | {r['eval/fd']:.2f} | {r['eval/fd'] / ddpm_fd:.2f} | "
        f"{r['eval/precision']:.3f} | {r['eval/recall']:.3f} | {r['eval/class_coverage']:.3f} | "
        f"{r['seconds']:.1f} s | {rows[0]['seconds'] / r['seconds']:.0f}x |" for r in rows)
    body = f"""## Sampler quality vs cost on MNIST (`benchmarks/sampler_quality.py`)

Machine: {machine()}. Command: `.venv/bin/python benchmarks/sampler_quality.py`.
The 20-minute ldmkit MNIST run of `time_to_quality.py` (step {step}, EMA weights), {NUM} samples
per sampler from the same noise, decoded and scored against {REAL} MNIST test images (features
of the in-project classifier). Wall time: sampling and decoding all {NUM} images, batches of 256,
one timing each; speed-up: DDPM 1000's wall time over the sampler's.

| sampler | steps | FD | FD / DDPM 1000 | precision | recall | coverage | wall time | speed-up |
|---|---|---|---|---|---|---|---|---|
{table}

Target: DPM-Solver++(2M) at 20 steps within 10 % of DDPM 1000's FD: {off:+.1%},
**{'met' if off <= 0.10 else 'missed'}**.
"""
    print(body)
    write_section("sampler_quality", body)


if __name__ == "__main__":
    main()
