"""Quality metrics on cases with known answers, and `ldmkit eval` end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from ldmkit.cli import main
from ldmkit.config import DataConfig
from ldmkit.platform.images import save_png, to_pil
from ldmkit.sampling.classifier import cache_root, load_or_train
from ldmkit.sampling.evaluate import Reference, quality_metrics
from ldmkit.sampling.quality import class_coverage, frechet_distance, memorization_rate, precision_recall
from ldmkit.training.loop import train
from ldmkit.vitals.logs.metrics_jsonl import read_metrics


def gaussian(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_identical_sets_have_fd_zero_and_full_precision_recall():
    x = gaussian(500)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert precision_recall(x, x.clone()) == (1.0, 1.0)


def test_fd_of_a_shift_is_its_squared_length_and_disjoint_sets_have_no_precision():
    x = gaussian(4000)
    shift = torch.zeros(8)
    shift[0] = 3.0
    assert frechet_distance(x, gaussian(4000, seed=1) + shift) == pytest.approx(9.0, rel=0.05)
    precision, recall = precision_recall(x, x + 50.0)
    assert precision == 0.0 and recall == 0.0


def test_class_coverage_is_one_when_balanced_and_one_over_classes_for_one_class():
    assert class_coverage(torch.arange(1000) % 10, 10) == pytest.approx(1.0)
    assert class_coverage(torch.full((1000,), 3), 10) == pytest.approx(0.1)


def test_memorization_is_one_for_copies_and_low_for_new_samples():
    train_set, new = gaussian(1000), gaussian(500, seed=2)
    assert memorization_rate(train_set[7].expand(200, -1), train_set) == 1.0
    assert memorization_rate(new, train_set) < 0.15


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LDMKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield load_or_train(DataConfig(image_size=16))


def test_classifier_is_accurate_and_cached(digits_classifier):
    clf, train_set, held_out = digits_classifier
    assert clf.held_out_accuracy > 0.9 and len(train_set) + len(held_out) == 1797
    assert any(cache_root().iterdir())
    again, _, _ = load_or_train(DataConfig(image_size=16))  # from the cache
    assert again.held_out_accuracy == clf.held_out_accuracy


def test_real_images_score_well_and_one_repeated_image_scores_as_collapse(digits_classifier):
    clf, train_set, held_out = digits_classifier
    good = quality_metrics(Reference.of(clf, held_out.images[300:], train_set.images),
                           held_out.images[:300])
    assert good["eval/class_coverage"] > 0.95 and good["eval/precision"] > 0.8
    assert good["eval/memorization"] < 0.15
    copies = train_set.images[:1].expand(300, -1, -1, -1)
    bad = quality_metrics(Reference.of(clf, held_out.images, train_set.images), copies)
    assert bad["eval/class_coverage"] == pytest.approx(1 / clf.classes)
    assert bad["eval/memorization"] == 1.0 and bad["eval/fd"] > 10 * good["eval/fd"]


def test_eval_command_logs_eval_metrics(tmp_path, digits_classifier, capsys):
    run = train(tiny_config(train={"steps": 4}), tmp_path / "run")
    assert main(["eval", str(run.run_dir), "--num", "64", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    tags = {r["tag"] for r in read_metrics(run.run_dir / "metrics.jsonl") if r["tag"].startswith("eval/")}
    assert {"eval/fd", "eval/precision", "eval/recall", "eval/class_coverage",
            "eval/memorization"} <= tags and "eval/fd:" in out


def test_eval_during_training_logs_eval_metrics_and_names_them_in_the_verdict(
        tmp_path, digits_classifier, capsys):
    run = train(tiny_config(train={"steps": 12, "eval_every": 6, "sample_every": 100}),
                tmp_path / "run")
    steps = sorted({r["step"] for r in read_metrics(run.run_dir / "metrics.jsonl")
                    if r["tag"] == "eval/memorization"})
    assert steps == [6, 12]
    if run.scenario == "healthy":
        assert "sample quality measured at step 12" in run.verdict
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        torch.manual_seed(i)
        save_png(to_pil(torch.randint(0, 255, (1, 16, 16), dtype=torch.uint8)), folder / f"{i}.png")
    train(tiny_config(data={"source": "folder", "path": str(folder), "limit": None},
                      train={"steps": 2, "eval_every": 1, "sample_every": 100}), tmp_path / "f")
    assert "eval during training: off" in capsys.readouterr().out
    assert not any(r["tag"].startswith("eval/")
                   for r in read_metrics(tmp_path / "f" / "metrics.jsonl"))


def _class_folder(root, classes, per_class=3):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            save_png(to_pil(torch.full((3, 16, 16), 40 * i + 100 * c, dtype=torch.uint8)),
                     root / name / f"{i}.png")
    return {"source": "folder", "path": str(root), "limit": None, "channels": 3}


def test_metrics_a_small_set_cannot_support_are_skipped_with_the_reason(tmp_path):
    data = DataConfig(**_class_folder(tmp_path / "one", ["only"]), image_size=16)
    clf, train_set, held_out = load_or_train(data)
    assert clf.classes == 1 and len(held_out) == 1
    ref = Reference.of(clf, held_out.images, train_set.images[:1])
    skipped = {}
    values = quality_metrics(ref, train_set.images, skipped=skipped)
    assert set(skipped) == {"eval/fd", "eval/precision", "eval/recall", "eval/memorization"}
    assert "precision/recall needs at least 4" in skipped["eval/precision"]
    assert values == {"eval/class_coverage": 1.0,
                      "eval/classifier_accuracy": clf.held_out_accuracy}
    assert ref.news(skipped)[0].startswith("eval: eval/fd skipped: the Frechet distance needs")
    assert ref.news(skipped) == []  # each reason is said once


def test_eval_during_training_on_a_few_images_per_class_never_stops_the_run(tmp_path, capsys):
    data = _class_folder(tmp_path / "two", ["a", "b"])
    run = train(tiny_config(data=data, model={"num_classes": 2},
                            train={"steps": 2, "eval_every": 1, "sample_every": 100}),
                tmp_path / "run")
    assert run.step == 2
    assert "eval/precision, eval/recall skipped" in capsys.readouterr().out
    tags = {r["tag"] for r in read_metrics(run.run_dir / "metrics.jsonl")}
    assert "eval/class_coverage" in tags and "eval/precision" not in tags
