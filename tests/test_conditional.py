"""Class-conditional models (issue 15): labels from the data to the sampler, classifier-free
guidance, and the conditional vital signs and findings.

The fast tests check the pieces (the condition's plumbing, guidance, the label embedding's null
class, folder labels and their errors, the cache key); the slow ones train real tiny models on
the digits and judge them as a user would: with the in-project classifier and the findings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_faults import assert_healthy, config, raised

from ldmkit.cli import main
from ldmkit.conditioning.sources import requested_labels
from ldmkit.config import from_dict
from ldmkit.data.latents import build_cache, cache_meta, read_cache
from ldmkit.data.sources import check_labels, load_data
from ldmkit.diffusion import condition
from ldmkit.diffusion.condition import LABELS, NULL_LABEL, dropped, guided
from ldmkit.diffusion.parameterization import Parameterization
from ldmkit.errors import ConfigError, DataError, LdmkitError
from ldmkit.models.autoencoder import Autoencoder
from ldmkit.models.registry import build_backbone
from ldmkit.report.html import guidance_sweep, render_html
from ldmkit.run.context import diagnose_path, read_run
from ldmkit.run.layout import RunDir
from ldmkit.sampling.classifier import load_or_train
from ldmkit.sampling.generate import generate
from ldmkit.sampling.trained import load_for_sampling
from ldmkit.training.loop import train
from ldmkit.vitals import metrics as vm
from ldmkit.vitals.logs.metrics_jsonl import MetricLogger

# -- the condition and guidance --------------------------------------------------------------

def test_guidance_is_one_batched_forward_extrapolating_from_the_null_class():
    calls = []

    def estimate(x, t, cond):  # a denoiser that moves x by its label
        calls.append(len(x))
        return x + cond[LABELS].float().view(-1, 1)

    x, t = torch.zeros(3, 2), torch.full((3,), 0.5)
    cond = {LABELS: torch.tensor([1, 2, 3])}
    out = guided(estimate, cond, 4.0)(x, t)
    # unconditional: x + (-1); guided: u + 4 (c - u)
    assert torch.equal(out, -1 + 4 * (torch.tensor([1.0, 2, 3]) + 1).view(-1, 1).expand(3, 2))
    assert calls == [6]
    calls.clear()
    assert torch.equal(guided(estimate, cond, 1.0)(x, t), estimate(x, t, cond))
    assert calls == [3, 3]  # scale 1: the conditional estimate alone
    calls.clear()
    outside = guided(estimate, cond, 4.0, interval=(0.6, 1.0))(x, t)
    assert torch.equal(outside, x + cond[LABELS].float().view(-1, 1)) and calls == [3]


def test_dropping_labels_draws_nothing_for_an_unconditional_batch():
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    assert dropped({}, 0.1, gen) == {} and torch.equal(gen.get_state(), state)
    labels = torch.arange(10_000) % 7
    out = dropped({LABELS: labels}, 0.25, gen)[LABELS]
    share = (out == NULL_LABEL).float().mean().item()
    assert 0.23 < share < 0.27 and torch.equal(out[out != NULL_LABEL], labels[out != NULL_LABEL])
    parts = condition.chunk({LABELS: labels}, 4)
    assert torch.equal(torch.cat([p[LABELS] for p in parts]), labels)


BACKBONES = {"unet": {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                      "attention_resolutions": [2], "num_heads": 2},
             "dit": {"patch_size": 1, "hidden_size": 32, "depth": 2, "num_heads": 2}}


def trained_on_null(kind: str, args: dict, null: dict) -> torch.nn.Module:
    """A tiny ``kind`` backbone (with ``args``) trained 5 steps on the ``null`` condition only,
    as ``cond_drop_prob`` 1 trains it."""
    torch.manual_seed(0)
    model = build_backbone({"type": kind, "args": {"in_channels": 4, "latent_size": 4,
                                                   **BACKBONES[kind], **args}})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    param, x0 = Parameterization(), torch.randn(8, 4, 4, 4)
    for _ in range(5):
        t, eps = torch.rand(8), torch.randn(8, 4, 4, 4)
        loss = param.loss(model, x0, t, eps, null).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_labels_that_never_reach_the_model_leave_it_unconditional(kind):
    """The null row is fixed at zero and the class rows start there: a model trained on null
    labels only (cond_drop_prob 1) predicts the same for every class, so cond_gap is 0."""
    model = trained_on_null(kind, {"num_classes": 3}, {LABELS: torch.full((8,), NULL_LABEL)})
    x, t = torch.randn(6, 4, 4, 4), torch.rand(6)
    with torch.no_grad():
        unconditional = model(x, t)
        assert unconditional.abs().max() > 0
        for label in range(3):
            assert torch.equal(model(x, t, labels=torch.full((6,), label)), unconditional)
        assert vm.cond_gap(model(x, t, labels=torch.zeros(6, dtype=torch.long)),
                           unconditional).item() == 0.0
    assert model.label_emb.table.weight.abs().sum().item() == 0.0


# -- labels from the data --------------------------------------------------------------------

def write_classes(root: Path, counts: dict[str, int], corrupt: dict[str, int] | None = None
                  ) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shade = 40 * i + (100 if name.endswith("b") else 0)
            Image.new("L", (8, 8), color=shade % 256).save(root / name / f"{i}.png")
    for name, n in (corrupt or {}).items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / name / f"bad{i}.png").write_bytes(b"not a png")
    return root


def folder_config(root: Path, num_classes: int | None = 2, **data: object):
    return config(data={"source": "folder", "path": str(root), "image_size": 8, "limit": None,
                        **data},
                  model={"num_classes": num_classes})


def test_class_folders_are_the_labels(tmp_path):
    root = write_classes(tmp_path / "d", {"cat_a": 3, "dog_b": 2})
    data = load_data(folder_config(root).data)
    assert data.classes == ["cat_a", "dog_b"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    check_labels(data.labels, data.classes, 2, "d")
    Image.new("L", (8, 8)).save(root / "loose.png")  # an image outside every class folder
    assert load_data(folder_config(root).data).labels is None


@pytest.mark.parametrize("case, message", [
    ("empty", "class folder 'empty' of d holds no readable image"),
    ("corrupt", "class folder 'corrupt' of d holds no readable image"),
    ("count", "has 2 class folders (a, b) but model.num_classes is 5; set model.num_classes: 2"),
    ("unlabelled", "model.num_classes is 2 but d has no labels"),
    ("beyond", "has label 9, beyond model.num_classes 2; set model.num_classes: 10"),
])
def test_labels_that_cannot_train_a_conditional_model_are_one_line_errors(tmp_path, case, message):
    root = write_classes(tmp_path / "d", {"a": 2, "b": 2})
    classes, labels, num_classes = ["a", "b"], torch.tensor([0, 0, 1, 1]), 2
    if case == "empty":
        (root / "empty").mkdir()
        classes, labels, num_classes = ["a", "b", "empty"], labels, 3
        assert load_data(folder_config(root, 3).data).classes == classes
    elif case == "corrupt":
        write_classes(root, {}, corrupt={"corrupt": 2})
        data = load_data(folder_config(root, 3).data)
        classes, labels, num_classes = data.classes, data.labels, 3
    elif case == "count":
        num_classes = 5
    elif case == "unlabelled":
        labels = None
    else:
        classes, labels = None, torch.tensor([0, 9])
    with pytest.raises(DataError) as err:
        check_labels(labels, classes, num_classes, "d")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_conditional_run_on_an_empty_class_folder_stops_before_training(tmp_path, capsys):
    root = write_classes(tmp_path / "d", {"a": 4, "b": 4})
    (root / "c").mkdir()
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(json.dumps({"data": {"source": "folder", "path": str(root),
                                             "image_size": 8}, "model": {"num_classes": 3},
                                    "run_dir": str(tmp_path / "run")}))
    assert main(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class folder 'c'" in err[0]
    assert not (tmp_path / "run" / "autoencoder").exists()


def test_relabelled_images_rebuild_the_latent_cache(tmp_path):
    root = write_classes(tmp_path / "d", {"a": 3, "b": 3})
    cfg = folder_config(root)
    ae_dir = tmp_path / "ae"
    ae_dir.mkdir()
    (ae_dir / "meta.json").write_text("{}")
    ae = Autoencoder(1, 8, [1, 2], 4)
    meta = cache_meta(cfg, ae_dir)
    cached = build_cache(ae, cfg, tmp_path / "cache", meta)
    assert cached.labels.tolist() == [0, 0, 0, 1, 1, 1] and cached.classes == ["a", "b"]
    assert read_cache(tmp_path / "cache", cache_meta(cfg, ae_dir)) is not None
    shutil.move(root / "a" / "0.png", root / "b" / "9.png")  # one image changes class
    assert read_cache(tmp_path / "cache", cache_meta(cfg, ae_dir)) is None


def test_class_choice_on_the_command_line():
    labels, columns = requested_labels("all", 25, 4)
    assert labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6 and columns == 6
    assert requested_labels("dog", 3, 2, ["cat", "dog"])[0].tolist() == [1, 1, 1]
    assert requested_labels(None, 5, 2)[0].tolist() == [0, 1, 0, 1, 0]
    assert requested_labels(None, 5, None) == (None, None)
    for choice, classes in (("12", None), ("-1", None), ("horse", ["cat", "dog"])):
        with pytest.raises(LdmkitError, match="is not a class of this model"):
            requested_labels(choice, 4, 10, classes)
    with pytest.raises(LdmkitError, match="not class-conditional"):
        requested_labels("3", 4, None)


def test_guidance_interval_is_checked():
    with pytest.raises(ConfigError, match="sample.guidance_interval"):
        config(sample={"guidance_interval": [0.8, 0.2]})
    with pytest.raises(ConfigError, match="model.num_classes"):
        config(model={"num_classes": 0})


# -- real runs -------------------------------------------------------------------------------

CONDITIONAL = {"model": {"num_classes": 10}, "train": {"steps": 800}}


@pytest.fixture(scope="session")
def conditional_run(tmp_path_factory, ae_digits) -> Path:
    path = tmp_path_factory.mktemp("conditional") / "run"
    train(config(autoencoder={"pretrained": ae_digits}, **CONDITIONAL), path)
    return path


def class_accuracy(run_dir: Path, guidance: float, num: int = 200) -> float:
    trained = load_for_sampling(run_dir)
    cfg = from_dict(trained.config)
    samples = generate(trained.model, trained.ae, trained.scale, cfg, num, "dpmpp_2m", 20, 1,
                       guidance=guidance)
    clf = load_or_train(cfg.data)[0]
    predicted = clf.embed(samples.images.float().div(127.5).sub(1))[1]
    return (predicted == samples.labels).float().mean().item()


@pytest.mark.xdist_group("conditional_run")
@pytest.mark.slow
def test_a_class_conditional_run_follows_its_labels_and_is_healthy(conditional_run):
    assert_healthy(conditional_run)
    gaps = [r["value"] for r in map(json.loads, (conditional_run / "metrics.jsonl").open())
            if r["tag"] == vm.COND_GAP]
    assert len(gaps) == 80 and gaps[-1] > 0.05
    accuracy = class_accuracy(conditional_run, 3.0)
    print(f"class accuracy at guidance 3: {accuracy:.2f}")
    assert accuracy > 0.6  # chance: 0.1


@pytest.mark.slow
def test_a_class_conditional_dit_follows_its_labels(tmp_path, ae_digits):
    """The DiT's label embedding drives its adaLN: trained as the UNet is, it follows them too."""
    dit = {"type": "dit", "patch_size": 1, "hidden_size": 64, "depth": 4, "num_heads": 4,
           "num_classes": 10}
    train(config(autoencoder={"pretrained": ae_digits}, model=dit,
                 train={"steps": 800, "lr": 1e-3}), tmp_path / "run")
    assert_healthy(tmp_path / "run")
    accuracy = class_accuracy(tmp_path / "run", 3.0)
    print(f"DiT class accuracy at guidance 3: {accuracy:.2f}")
    assert accuracy > 0.6  # chance: 0.1


@pytest.mark.slow
def test_dropping_every_label_is_diagnosed(tmp_path, ae_digits):
    train(config(autoencoder={"pretrained": ae_digits}, model={"num_classes": 10},
                 train={"steps": 400, "cond_drop_prob": 1.0}), tmp_path / "run")
    serious = {e["code"] for e in raised(tmp_path / "run") if e["severity"] != "info"}
    assert serious == {"conditioning_ignored"}


@pytest.mark.xdist_group("conditional_run")
@pytest.mark.slow
def test_sampling_classes_and_guidance_from_the_command_line(tmp_path, conditional_run, capsys):
    run_dir = tmp_path / "copy"
    shutil.copytree(conditional_run, run_dir)
    assert main(["sample", str(run_dir), "--class", "12", "--num", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--class 12 is not a class of this model (0-9)" in err[0]
    # a class name holding a line break: still one line, the break shown escaped
    assert main(["sample", str(run_dir), "--class", "sev\nen", "--num", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--class sev\\nen is not a class" in err[0]
    # names for 3 classes on a model of 10: damaged, never put on the wrong classes
    RunDir(run_dir).classes_file.write_text('["a", "b", "c"]')
    assert main(["sample", str(run_dir), "--class", "a", "--num", "4"]) == 2
    err = capsys.readouterr().err
    assert "classes.json' is damaged (3 names for a model of 10 classes)" in err
    RunDir(run_dir).classes_file.unlink()
    assert main(["sample", str(run_dir), "--class", "all", "--num", "20", "--steps", "5",
                 "--guidance", "3", "--out", str(tmp_path / "grid")]) == 0
    grid = Image.open(tmp_path / "grid" / "grid.png")
    assert len(list((tmp_path / "grid").glob("0*.png"))) == 20
    assert grid.size[1] > 4 * grid.size[0]  # 10 rows of 2: one row per class
    tags = {r["tag"] for r in map(json.loads, (run_dir / "metrics.jsonl").open())}
    assert vm.guidance_tag(vm.FINAL_PREFIX + "std", 3) in tags
    assert "cfg_without_uncond" not in {e["code"] for e in raised(run_dir)}
    # the guidance sweep: eval/* per scale, plotted by the report
    assert main(["eval", str(run_dir), "--num", "100", "--steps", "10", "--guidance", "1,3"]) == 0
    series = read_run(run_dir)[0].series
    sweep = guidance_sweep(series)
    assert [g for g, _ in sweep["eval/class_accuracy"]] == [1.0, 3.0]
    assert sweep["eval/class_accuracy"][1][1] > 0.3
    assert "Guidance sweep" in render_html(run_dir)


@pytest.mark.slow
def test_guidance_from_a_model_without_the_null_class_is_flagged(tmp_path, ae_digits, capsys):
    train(config(autoencoder={"pretrained": ae_digits}, model={"num_classes": 10},
                 train={"steps": 20, "cond_drop_prob": 0.0}), tmp_path / "run")
    assert main(["sample", str(tmp_path / "run"), "--num", "4", "--steps", "3"]) == 0
    assert "cfg_without_uncond" not in {e["code"] for e in raised(tmp_path / "run")}
    assert main(["sample", str(tmp_path / "run"), "--num", "4", "--steps", "3",
                 "--guidance", "4"]) == 0
    assert "cfg_without_uncond" in {e["code"] for e in raised(tmp_path / "run")}
    assert "WARNING cfg_without_uncond" in capsys.readouterr().out


@pytest.mark.xdist_group("conditional_run")
@pytest.mark.slow
@pytest.mark.parametrize("guidance, expected", [(50.0, True), (1.0, False)])
def test_too_strong_guidance_is_told_apart_from_a_sick_model(tmp_path, conditional_run, guidance,
                                                            expected):
    run_dir = tmp_path / "copy"
    shutil.copytree(conditional_run, run_dir)
    assert main(["sample", str(run_dir), "--num", "64", "--steps", "20", "--guidance",
                 str(guidance), "--out", str(tmp_path / "s")]) == 0
    codes = {f.code for f in diagnose_path(run_dir).findings}
    assert ("guidance_too_high" in codes) == expected
    assert codes <= {"guidance_too_high"}


class Collapsed(torch.nn.Module):
    """A trained model whose samples of one condition (the rows where ``hit(cond)``) always
    denoise to one fixed latent: that class's or prompt's samples are all the same image, the
    others are the model's."""

    def __init__(self, model: torch.nn.Module, hit, target: torch.Tensor):
        super().__init__()
        self.model, self.hit, self.target = model, hit, target
        self.num_classes, self.text = model.num_classes, model.text
        self.condition_keys = model.condition_keys
        self.schedule = Parameterization().schedule  # the tests' runs train eps-prediction

    def forward(self, x, t, **cond):
        out = self.model(x, t, **cond)
        alpha, sigma = (v.view(-1, 1, 1, 1).float() for v in self.schedule.alpha_sigma(t))
        fixed = (x - alpha * self.target) / sigma  # the noise that denoises x to the target
        return torch.where(self.hit(cond).view(-1, 1, 1, 1), fixed, out)


@pytest.mark.xdist_group("conditional_run")
@pytest.mark.slow
def test_one_collapsed_class_is_found_while_the_batch_looks_diverse(tmp_path, conditional_run):
    run_dir = tmp_path / "copy"
    shutil.copytree(conditional_run, run_dir)
    trained = load_for_sampling(run_dir)
    cfg = from_dict(trained.config)
    planted = Collapsed(trained.model, lambda cond: cond[LABELS] == 3, torch.zeros(4, 4, 4))
    samples = generate(planted, trained.ae, trained.scale, cfg, 40, "ddim", 20, 5, guidance=1.0)
    assert samples.vitals[vm.LEAST_DIVERSE_CLASS] == 3
    with MetricLogger(run_dir, tensorboard=False) as logger:
        logger.log(trained.step, samples.vitals)
    findings = {f.code: f for f in diagnose_path(run_dir).findings}
    assert set(findings) == {"class_collapse"} and "class 3" in findings["class_collapse"].message


@pytest.mark.xdist_group("conditional_run")
@pytest.mark.slow
def test_a_class_conditional_run_exports_with_its_labels(tmp_path, conditional_run):
    pytest.importorskip("diffusers")
    from ldmkit.models.diffusers_export import LdmkitUNet

    assert main(["export", str(conditional_run), str(tmp_path / "out")]) == 0
    unet = LdmkitUNet.from_pretrained(tmp_path / "out" / "unet").eval()
    model = load_for_sampling(conditional_run).model
    x, k = torch.randn(4, 4, 4, 4), torch.tensor([0, 300, 600, 999])
    labels = torch.tensor([0, 3, 9, 10])  # 10: diffusers' null class
    with torch.no_grad():
        out = unet(x, k, class_labels=labels).sample
        assert torch.allclose(out, model(x, k / 999.0, labels=labels), atol=1e-5)
        assert not torch.allclose(out, unet(x, k, class_labels=torch.full((4,), 10)).sample)
