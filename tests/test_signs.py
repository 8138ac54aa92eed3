"""The vital-sign registry (issue 14, item 5): one table that the step, DDP, the accumulator,
the plots and the summary read; ``ldmkit.vitals`` usable without the trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldmkit.report.summary import summary_text
from ldmkit.training.loop import TrainResult
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.context import Context
from ldmkit.vitals.signs import (
    BY_TAG,
    PLOTTED,
    SIGNS,
    TRAIN_TAGS,
    StepAccumulator,
    StepTensors,
    bands,
    rank_reduced,
    step_vitals,
)


def step(n: int = 64, seed: int = 0, **extra) -> StepTensors:
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, 4, 8, 8, generator=gen)
    eps_pred = eps + 0.8 * torch.randn(n, 4, 8, 8, generator=gen)
    z = 1.3 * torch.randn(n, 4, 8, 8, generator=gen) + 0.2
    return StepTensors((eps_pred - eps).pow(2).mean(), eps_pred, eps,
                       torch.rand(n, generator=gen), z, **extra)


def test_a_step_logs_every_sign_with_a_step_computation_and_nothing_else():
    vitals = step_vitals(step(grad_norm=torch.tensor(2.5)))
    assert set(vitals) == set(TRAIN_TAGS) - {vm.LEARNING_RATE}
    assert vitals[vm.GRAD_NORM] == 2.5 and 0 < vitals[vm.COS_EPS] < 1
    assert vitals[vm.Z_STD] == pytest.approx(1.3, rel=0.05)
    not_eps = step_vitals(step(loss_is_eps_mse=False))
    assert vm.EPS_MSE in not_eps and vm.GRAD_NORM not in not_eps  # no norm handed over


def test_ranks_reduced_by_the_table_equal_the_whole_batch():
    """Two equal shards reduced as DDP would (mean of each rank's vector) give the vitals of
    the whole batch: means for the loss and cosine, the pooled std for z."""
    whole = step(64, loss_is_eps_mse=False)
    halves = [StepTensors((pred - eps).pow(2).mean(), pred, eps, t, z, loss_is_eps_mse=False)
              for pred, eps, t, z in zip(whole.eps_pred.chunk(2), whole.eps.chunk(2),
                                         whole.t.chunk(2), whole.z.chunk(2), strict=True)]
    sent = []
    per_rank = [step_vitals(h) for h in halves]
    for vitals, h in zip(per_rank, halves, strict=True):
        rank_reduced(vitals, {"z": h.z}, 2, lambda v: sent.append(v) or v)
    both = (sent[0] + sent[1]) / 2
    reduced = rank_reduced(per_rank[0], {"z": halves[0].z}, 2, lambda v: both)
    expected = step_vitals(whole)
    for tag in (vm.LOSS, vm.EPS_MSE, vm.T_MEAN, vm.Z_STD):
        assert reduced[tag].item() == pytest.approx(expected[tag].item(), rel=1e-6), tag
    assert reduced[vm.COS_EPS].item() == pytest.approx(expected[vm.COS_EPS].item(), rel=1e-6)


def test_the_accumulator_takes_the_median_where_the_sign_says():
    acc = StepAccumulator()
    for ratio, loss in ((1e-3, 1.0), (1e-3, 2.0), (1.0, 3.0)):
        acc.add({vm.UPDATE_RATIO: torch.tensor(ratio), vm.LOSS: torch.tensor(loss)})
    out = acc.read()
    assert out[vm.UPDATE_RATIO] == pytest.approx(1e-3) and out[vm.LOSS] == pytest.approx(2.0)


def test_every_band_and_every_plotted_tag_comes_from_the_table():
    ctx = Context.of(0.6436, loss_scale=2.0)
    from ldmkit.report.html import shown_tags

    series = {tag: [(1, 0.5)] for tag in ("eval/new_score", "other/tag", *reversed(PLOTTED))}
    # the table's order, then eval figures it does not know yet
    assert shown_tags(series) == [s.tag for s in SIGNS] + ["eval/new_score"]
    assert bands("no/such_tag", ctx) == []
    (good, *bad) = bands(vm.LOSS, ctx)
    assert (good.low, good.high) == pytest.approx((0.2, 0.8))  # the guide's 0.1-0.4, flow's units
    extreme = bands(vm.FINAL_PREFIX + "min", ctx)[0]
    assert extreme.low == pytest.approx(-3 * 1.86 / 0.6436)


def test_the_summary_shows_the_ranges_the_rules_apply_to_this_run(tmp_path: Path):
    """The demo's final min -7.17 at scale 0.644: inside the converted +-8.67, not the guide's
    +-3 at its example scale, and the row says so."""
    result = TrainResult(tmp_path, 1500, 0.6436, {vm.FINAL_PREFIX + "min": -7.17,
                                                   vm.Z_STD: 0.15, vm.LOSS: 0.2},
                         None, 60.0)
    rows = {line.split("|")[1].strip(" `"): line for line in summary_text(result).splitlines()
            if line.startswith("| `")}
    assert ">= -3 at the guide's scale 1.86" in rows[vm.FINAL_PREFIX + "min"]
    assert "good -8.67 to 8.67; bad < -57.8, > 57.8 | ok" in rows[vm.FINAL_PREFIX + "min"]
    assert rows[vm.Z_STD].rstrip(" |").endswith("bad")
    assert "good 0.1 to 0.4" in rows[vm.LOSS]


def test_the_tag_lists_of_diagnosis_report_and_sweep_come_from_the_signs_groups():
    from ldmkit.vitals.offline import GUIDE_TAGS
    from ldmkit.vitals.signs import QUALITY_TAGS, SWEPT, tags_of

    assert QUALITY_TAGS == (vm.EVAL_FD, vm.EVAL_PRECISION, vm.EVAL_RECALL)
    assert SWEPT == QUALITY_TAGS + (vm.EVAL_CLASS_ACCURACY, vm.EVAL_CLIP_SCORE,
                                    vm.EVAL_PROMPT_RETRIEVAL)
    assert set(tags_of("eval")) >= set(SWEPT) and vm.VAE_PSNR in tags_of("autoencoder")
    assert all(BY_TAG[t].guide for t in GUIDE_TAGS)
    # the guide's signs a rule reads; pairwise_mse_min is judged inside mode_collapse
    assert {vm.LOSS, vm.Z_STD, vm.PAIRWISE_PREFIX + "mean", vm.FINAL_PREFIX + "max"} <= set(GUIDE_TAGS)
    assert vm.PAIRWISE_PREFIX + "min" not in GUIDE_TAGS
    assert {s.group for s in SIGNS} == {"train", "sample", "validation", "eval", "autoencoder"}
