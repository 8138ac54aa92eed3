"""Where a DiT step's time goes: fp32 against bf16, and one batch against a doubled one.

Run: ``.venv/bin/python benchmarks/dit_profile.py`` (about 3 minutes on 2 cores, alone).
``configs/digits-dit.yaml``'s DiT (192 wide, 6 deep, patch 2) on 4x8x8 latents: a training
step (forward, backward, AdamW) at batch 128 in fp32 and in bf16 autocast, and a sampling
forward at batch 64 and 128 (a guided call is one forward of both halves). Prints torch
profiler's heaviest operators by self CPU time for each, and the medians of alternated timings.
For reading, not for BENCHMARKS.md: it is how the DiT's fast-path figures were explained.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import step_fn  # noqa: E402

from ldmkit.config import load_config  # noqa: E402
from ldmkit.models.registry import backbone_spec, build_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def dit() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/digits-dit.yaml")
    return build_backbone(backbone_spec(cfg.model, 4, 8))


def train_step(bf16: bool) -> Callable[[], None]:
    model = dit()

    def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return model(x, t)

    return step_fn(model, False, forward)


def sample_call(batch: int, bf16: bool) -> Callable[[], None]:
    model = dit().eval()
    x, t = torch.randn(batch, 4, 8, 8), torch.rand(batch)

    @torch.no_grad()
    def call() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            model(x, t)

    return call


def timed(calls: dict[str, Callable[[], None]], rounds: int = 7, per: int = 5
          ) -> dict[str, float]:
    """Median milliseconds per call, the variants alternating round by round."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(per):
                call()
            times[name].append((time.perf_counter() - start) / per * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def heaviest(call: Callable[[], None], rows: int = 12) -> str:
    call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            call()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    train = {"train fp32": train_step(False), "train bf16": train_step(True)}
    sample = {f"sample {b} {p}": sample_call(b, p == "bf16") for b in (64, 128)
              for p in ("fp32", "bf16")}
    for name, call in {**train, **sample}.items():
        print(f"== {name}\n{heaviest(call)}")
    for name, ms in {**timed(train), **timed(sample)}.items():
        print(f"{name}: {ms:.1f} ms")


if __name__ == "__main__":
    main()
