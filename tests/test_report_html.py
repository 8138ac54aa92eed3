"""The HTML report: written by `ldmkit run`, self-contained, and every plot renders in Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from ldmkit.cli import main
from ldmkit.report.svg import line_plot
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.diagnose import Context
from ldmkit.vitals.signs import TRAIN_TAGS, bands


def chromium() -> str:
    """Debian's Chromium, installed here when absent (as root with apt); else skip with why."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            try:
                subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=True)
            except (subprocess.SubprocessError, OSError) as exc:
                pytest.skip(f"Chromium is absent and `{' '.join(cmd)}` failed: {exc}")
        found = shutil.which("chromium")
    if not found:
        pytest.skip("Chromium is absent and cannot be installed here (needs root and apt-get)")
    return found


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    cfg = {**TINY, "run_dir": str(tmp / "run"), "diffusion": {"latent_scale_factor": 0.1}}
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp / "c.yaml")]) == 0
    return tmp / "run"


def test_run_writes_a_self_contained_report(run_dir):
    html = (run_dir / "report.html").read_text()
    assert html.count('<svg class="plot"') >= len(TRAIN_TAGS) + 8
    for tag in (*TRAIN_TAGS, vm.PAIRWISE_PREFIX + "mean", vm.FINAL_PREFIX + "std"):
        assert f'aria-label="{tag}"' in html
    # the wrong scale was diagnosed: a finding row with its fix and a marker on the z_std plot
    assert "z_std_low" in html and "latent_scale_factor" in html
    z_plot = html.split(f'aria-label="{vm.Z_STD}"')[1].split("</svg>")[0]
    assert 'class="finding"' in z_plot and 'class="band bad"' in z_plot
    assert "Autoencoder reconstructions" in html and "Samples over training" in html
    heat = html.split('<svg class="plot heatmap"')[1].split("</svg>")[0]
    assert heat.count('<rect class="series"') == 2 * vm.VAL_BUCKETS  # steps 0 and 12
    assert f'aria-label="{vm.VAL_LOSS}"' in html and f'aria-label="{vm.COPY_SHARE}"' in html
    assert not re.search(r'src="(?!data:)', html), "every image must be embedded"


@pytest.mark.slow
def test_every_plot_renders_in_headless_chromium(run_dir, tmp_path):
    browser = chromium()
    report = run_dir / "report.html"
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=5000", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    body = re.search(r"<body[^>]*>", out.stdout)
    assert body, out.stderr[-2000:]
    attrs = dict(re.findall(r'data-([a-z-]+)="(\d+)"', body.group(0)))
    assert int(attrs["plots-total"]) >= len(TRAIN_TAGS) + 8
    assert attrs["plots-rendered"] == attrs["plots-total"]
    assert int(attrs["images-total"]) >= 3 and attrs["images-rendered"] == attrs["images-total"]
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--window-size=1200,2400", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_bands_follow_the_thresholds_and_the_scale():
    ctx = Context(latent_scale_factor=0.5)
    z = {(b.kind, b.low, b.high) for b in bands(vm.Z_STD, ctx)}
    assert ("bad", None, 0.2) in z and ("bad", 5.0, None) in z and ("good", 0.5, 2.0) in z
    std = {(b.kind, b.low, b.high) for b in bands(vm.FINAL_PREFIX + "std", ctx)}
    assert ("good", 1.0, 4.0) in std  # target 1/0.5 = 2, within 2x
    healthy = line_plot("x", [(0, 1.0), (10, float("nan")), (20, 0.5)], bands(vm.Z_STD, ctx), [])
    assert healthy.count('class="band good"') == 1 and 'class="band bad"' not in healthy
    assert 'class="series" d="M' in healthy and "nan" not in healthy
    sick = line_plot("x", [(0, 0.1), (20, 1.0)], bands(vm.Z_STD, ctx), [])
    assert sick.count('class="band bad"') == 1  # only the band the values reach is in view
