"""``ldmkit probe`` (issue 29): the guide's vital signs for a diffusers pipeline and its LoRAs or
fine-tuned checkpoints, checkpoint by checkpoint, and which checkpoint to keep.

Tiny pipelines are built from their configs with random weights and file-free tokenizers
(``tiny_pipelines``), the SD-like one pretrained for a few hundred steps on captioned digits so
that its prompts select what it draws, then fine-tuned into real checkpoint series as trainers
write them: a LoRA on 96 images in diffusers'/peft's layout and in kohya's (the same weights),
a full fine-tune of 2 images trained far too long (ai-toolkit's names), a LoRA of an SD3-like
flow-matching transformer. Nothing is downloaded (conftest sets ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import tiny_pipelines as tp  # noqa: E402

from ldmkit.cli import main  # noqa: E402
from ldmkit.errors import CheckpointError  # noqa: E402
from ldmkit.probe.checkpoints import find_series  # noqa: E402
from ldmkit.probe.run import ProbeOptions, probe  # noqa: E402
from ldmkit.run.context import diagnose_path, read_run  # noqa: E402
from ldmkit.vitals import tags as vm  # noqa: E402
from ldmkit.vitals.context import Context  # noqa: E402
from ldmkit.vitals.keep import choose  # noqa: E402

GROUP = pytest.mark.xdist_group("probe")  # one worker builds the pipelines once
SLOW = pytest.mark.slow
FAST = ProbeOptions(points=60, prompts=2, seeds=4, steps=10, guidance=3.0)
TINY = ProbeOptions(points=20, prompts=1, seeds=2, steps=2, guidance=1.0, resolution=tp.SIZE)


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("probe_data")
    return {"many": tp.captioned_digits(root / "many", 96),
            "few": tp.captioned_digits(root / "few", 2, offset=300),
            "hold": tp.captioned_digits(root / "hold", 32, offset=400, caption_files=False)}


@pytest.fixture(scope="session")
def sd_base(folders, tmp_path_factory) -> Path:
    pipe = tp.sd_pipeline(tp.folder_images(folders["many"]))
    tp.train_vae(pipe, tp.folder_images(folders["many"]), 100)
    tp.pretrain(pipe, folders["many"], 200)
    path = tmp_path_factory.mktemp("sd") / "base"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def healthy(sd_base, folders, tmp_path_factory) -> dict[str, Path]:
    return tp.lora_series(sd_base, folders["many"], tmp_path_factory.mktemp("healthy"), [20, 60])


@pytest.fixture(scope="session")
def healthy_probe(sd_base, folders, healthy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probes") / "healthy"
    probe(sd_base, folders["many"], [healthy["peft"]], folders["hold"], out, FAST)
    return out


@pytest.fixture(scope="session")
def overtrained(sd_base, folders, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("over")
    tp.full_series(sd_base, folders["few"], out, [5, 25, 300], lr=2e-3, batch=16, name="few")
    return out


def series_of(out: Path) -> dict[str, list[tuple[int, float]]]:
    return read_run(out, require_values=False)[0].series


def at(series: dict, tag: str) -> dict[int, float]:
    return dict(series[tag])


@SLOW
@GROUP
def test_a_healthy_lora_series_keeps_its_lowest_held_out_loss(healthy_probe, capsys):
    series = series_of(healthy_probe)
    held, train = at(series, vm.VAL_LOSS), at(series, vm.VAL_TRAIN_LOSS)
    assert sorted(held) == [0, 20, 60]  # the base, then checkpoint-20 and checkpoint-60
    assert held[60] < held[0] and train[60] < train[0]  # it learned, held-out images included
    assert all(at(series, vm.COPY_SHARE)[s] == 0 for s in held)
    assert all(vm.val_bucket_tag(k) in series for k in range(vm.VAL_BUCKETS))
    assert at(series, vm.Z_STD)[0] == pytest.approx(1.0, abs=0.05)  # the calibrated scale
    settings = json.loads((healthy_probe / "probe.json").read_text())
    best = min((s for s in held if s), key=held.get)
    assert settings["keep"]["step"] == best
    assert "the lowest held-out loss" in settings["keep"]["reason"]
    assert [e["name"] for e in settings["measured"]] == ["base", "checkpoint-20", "checkpoint-60"]
    diagnosis = diagnose_path(healthy_probe)
    # judged checkpoint by checkpoint: healthy, never "too early" for want of a training loss
    assert diagnosis.findings == [] and diagnosis.scenario == "healthy"
    assert main(["report", str(healthy_probe)]) == 0
    html = (healthy_probe / "report.html").read_text()
    assert "Which checkpoint to keep" in html and html.count("<img") >= 3


@SLOW
@GROUP
def test_a_kohya_lora_measures_as_the_same_weights_in_peft_layout(sd_base, folders, healthy,
                                                                  healthy_probe, tmp_path):
    names = [c.name for c in find_series([healthy["kohya"]])]
    assert names == ["tiny-step00000020.safetensors", "tiny-step00000060.safetensors"]
    out = tmp_path / "kohya"
    probe(sd_base, folders["many"], [healthy["kohya"]], folders["hold"], out, FAST)
    kohya, peft = series_of(out), series_of(healthy_probe)
    for tag in (vm.VAL_LOSS, vm.VAL_TRAIN_LOSS, vm.PAIRWISE_PREFIX + "mean"):
        for step, value in peft[tag]:
            assert at(kohya, tag)[step] == pytest.approx(value, rel=1e-4), (tag, step)


@SLOW
@GROUP
def test_an_overtrained_series_is_caught_and_an_earlier_checkpoint_kept(sd_base, folders,
                                                                        overtrained, tmp_path):
    out = tmp_path / "over"
    options = dataclasses.replace(FAST, seeds=6)
    result = probe(sd_base, folders["few"], [overtrained], folders["hold"], out, options)
    series = series_of(out)
    held, train = at(series, vm.VAL_LOSS), at(series, vm.VAL_TRAIN_LOSS)
    assert train[300] < train[5] and held[300] > held[5]  # fits 2 images, not the rest
    assert at(series, vm.COPY_SHARE)[300] >= 0.25 > at(series, vm.COPY_SHARE)[5]
    judged = {j.step: j.spoilers for j in result.choice.judged}
    assert "memorization" in judged[300], judged
    assert result.choice.step is not None and result.choice.step < 300
    codes = {f.code for f in diagnose_path(out).findings}
    assert "overfitting" in codes and codes & {"memorization", "prompt_collapse"}


@SLOW
@GROUP
def test_a_vae_scale_8x_off_raises_z_std_high(sd_base, folders, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(sd_base, base)
    config = json.loads((base / "vae" / "config.json").read_text())
    config["scaling_factor"] *= 8
    (base / "vae" / "config.json").write_text(json.dumps(config))
    probe(base, folders["few"], [], None, tmp_path / "out", TINY)
    assert at(series_of(tmp_path / "out"), vm.Z_STD)[0] == pytest.approx(8, rel=0.2)
    findings = {f.code: f for f in diagnose_path(tmp_path / "out").findings}
    assert findings["z_std_high"].severity == "critical"


@SLOW
@GROUP
def test_a_rerun_measures_only_what_is_new(sd_base, folders, healthy, tmp_path, capsys):
    series = tmp_path / "series"
    shutil.copytree(healthy["peft"] / "checkpoint-20", series / "checkpoint-20")
    out = tmp_path / "out"
    assert main(["probe", str(sd_base), str(series / "checkpoint-20"), "--data",
                 str(folders["few"]), "--out", str(out), "--points", "20", "--prompts", "1",
                 "--seeds", "2", "--steps", "2"]) == 0
    assert "2 of 2 to measure" in capsys.readouterr().out
    shutil.copytree(healthy["peft"] / "checkpoint-60", series / "checkpoint-60")
    args = ["probe", str(sd_base), str(series), "--data", str(folders["few"]), "--out",
            str(out), "--points", "20", "--prompts", "1", "--seeds", "2", "--steps", "2"]
    assert main(args) == 0
    assert "1 of 3 to measure" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in records}) == [0, 20, 60]
    assert len(records) == 3 * len({r["tag"] for r in records})  # each step's once
    assert main(args[:-8] + ["--points", "30", "--prompts", "1", "--seeds", "2", "--steps",
                             "2"]) == 2
    assert "holds a probe of another points" in capsys.readouterr().err


@SLOW
@GROUP
def test_a_lora_that_changes_nothing_is_said_to_have_learned_nothing(sd_base, folders, healthy,
                                                                     tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(next(healthy["kohya"].glob("*.safetensors")))
    save_file({k: v.zero_() if "lora_up" in k else v for k, v in state.items()},
              tmp_path / "idle-step00000100.safetensors")
    result = probe(sd_base, folders["few"], [tmp_path / "idle-step00000100.safetensors"], None,
                   tmp_path / "out", TINY)
    series = series_of(tmp_path / "out")
    assert at(series, vm.VAL_LOSS)[100] == pytest.approx(at(series, vm.VAL_LOSS)[0], rel=1e-6)
    assert result.choice.step == 100 and "learned nothing" in result.choice.reason


@SLOW
@GROUP
def test_a_full_fine_tune_folder_is_probed_as_its_denoiser(sd_base, folders, tmp_path):
    folder = tmp_path / "series" / "checkpoint-7"
    shutil.copytree(sd_base / "unet", folder / "unet")  # the base's own weights: a no-op
    probe(sd_base, folders["few"], [tmp_path / "series"], None, tmp_path / "out", TINY)
    held = at(series_of(tmp_path / "out"), vm.VAL_LOSS)
    assert sorted(held) == [0, 7] and held[7] == pytest.approx(held[0], rel=1e-6)


def test_without_the_probe_extra_the_command_says_what_to_install(tmp_path, monkeypatch, capsys):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    data = tp.captioned_digits(tmp_path / "data", 2)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if it were not installed
    assert main(["probe", str(base), "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    assert "pip install 'ldmkit[probe]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def one_line_error(args: list[str], capsys, needle: str, out: Path) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@SLOW
@GROUP
def test_bad_inputs_are_one_line_errors_and_write_nothing(sd_base, folders, healthy, tmp_path,
                                                          capsys):
    out = tmp_path / "out"
    lora = next((healthy["kohya"]).glob("*.safetensors"))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(lora.read_bytes()[:200])
    reshaped = tmp_path / "other-base.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(lora)
    key = next(k for k in state if k.endswith("lora_down.weight") and state[k].ndim == 2)
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 8)
    save_file(state, reshaped)
    half = tmp_path / "mixed-names.safetensors"  # diffusers' converter renames attention only
    from diffusers.utils import convert_state_dict_to_diffusers

    peft_file = healthy["peft"] / "checkpoint-20" / "pytorch_lora_weights.safetensors"
    save_file(convert_state_dict_to_diffusers(load_file(peft_file)), half)
    foreign = tmp_path / "flux.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight":
               torch.zeros(4, 64), "transformer.single_transformer_blocks.0.attn.to_q.lora_B."
               "weight": torch.zeros(64, 4)}, foreign)
    empty = tmp_path / "empty"
    empty.mkdir()
    uncaptioned = tmp_path / "uncaptioned"
    shutil.copytree(folders["few"], uncaptioned)
    next(uncaptioned.glob("*.txt")).unlink()
    data = ["--data", str(folders["few"]), "--out", str(out), "--points", "20", "--prompts",
            "1", "--seeds", "2", "--steps", "2"]
    cases = [([str(tmp_path / "nowhere")], "is not a directory"),
             ([str(empty)], "has no model_index.json"),
             ([str(sd_base), str(damaged)], "is not a readable .safetensors file"),
             ([str(sd_base), str(reshaped)], "does not load onto this base"),
             ([str(sd_base), str(foreign)], "trained for another base model"),
             ([str(sd_base), str(half)], "of the 72 layers"),
             ([str(sd_base), str(empty)], "holds no checkpoint"),
             ([str(sd_base), str(tmp_path / "model.ckpt")], "does not exist")]
    for paths, needle in cases:
        one_line_error(["probe", *paths, *data], capsys, needle, out)
    one_line_error(["probe", str(sd_base), "--data", str(uncaptioned), "--out", str(out)],
                   capsys, "has no caption", out)
    one_line_error(["probe", str(sd_base), *data[:-8], "--points", "3"], capsys,
                   "--points 3 is out of range", out)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(["probe", str(sd_base), *data[:2], "--out", str(tmp_path / "mine")]) == 2
    assert "not an ldmkit probe" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


@SLOW
@GROUP
def test_flow_matching_pipelines_are_probed_in_their_own_objective(folders, tmp_path):
    images = tp.folder_images(folders["few"])
    sd3 = tp.save_pipeline("sd3", images, tmp_path / "sd3")
    series = tp.sd3_lora_series(sd3, folders["many"], tmp_path / "sd3-lora", [10, 30])
    result = probe(sd3, folders["many"], [series], folders["hold"], tmp_path / "p3", TINY)
    settings = json.loads((tmp_path / "p3" / "probe.json").read_text())
    assert (settings["pipeline"], settings["objective"], settings["shift"]) == \
        ("StableDiffusion3Pipeline", "flow", 3.0)
    held = at(series_of(tmp_path / "p3"), vm.VAL_LOSS)
    assert sorted(held) == [0, 10, 30] and held[30] < held[0]  # the LoRA is applied
    assert held[0] == pytest.approx(2.0, rel=0.25)  # an untrained velocity's loss: ~2
    assert result.choice.step in (10, 30)
    flux = tp.save_pipeline("flux", images, tmp_path / "flux")
    probe(flux, folders["few"], [], None, tmp_path / "pf", TINY)
    settings = json.loads((tmp_path / "pf" / "probe.json").read_text())
    assert settings["pipeline"] == "FluxPipeline" and settings["shift_factor"] == 0.1
    assert 1 < settings["shift"] < 2  # exp(mu) for 64 image tokens
    values = [v for records in series_of(tmp_path / "pf").values() for _, v in records]
    assert values and all(torch.isfinite(torch.tensor(values)))


@SLOW
@GROUP
def test_sdxl_is_probed_with_its_pooled_embedding_and_size_ids(folders, tmp_path):
    sdxl = tp.save_pipeline("sdxl", tp.folder_images(folders["few"]), tmp_path / "sdxl")
    probe(sdxl, folders["few"], [], None, tmp_path / "p", TINY)
    settings = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert (settings["pipeline"], settings["objective"]) == ("StableDiffusionXLPipeline", "eps")
    held = at(series_of(tmp_path / "p"), vm.VAL_LOSS)[0]
    assert held == pytest.approx(1.0, rel=0.3)  # an untrained eps-prediction's loss: ~1


def write_lora(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
               torch.zeros(2, 2)}, path)
    return path


@pytest.mark.parametrize("names, steps, expected", [
    (["job-000002", "job-000004", "job"], [2, 4, 5], ["job-000002", "job-000004", "job"]),
    (["job_000001000", "job_000000500"], [500, 1000], ["job_000000500", "job_000001000"]),
    (["2024-05-01_10-00-00-save-1200-3-0", "2024-05-01_09-00-00-save-400-1-0"], [400, 1200],
     ["2024-05-01_09-00-00-save-400-1-0", "2024-05-01_10-00-00-save-1200-3-0"]),
    (["job-step00000010", "job-step00000100"], [10, 100], ["job-step00000010",
                                                          "job-step00000100"]),
    (["last", "first"], [1, 2], ["first", "last"]),  # no numbers: by time
])
def test_a_series_is_ordered_as_the_trainers_name_it(tmp_path, names, steps, expected):
    for age, name in enumerate(reversed(expected)):
        path = write_lora(tmp_path / f"{name}.safetensors")
        os.utime(path, (1e9 - age * 100, 1e9 - age * 100))
    series = find_series([tmp_path])
    assert [c.path.stem for c in series] == expected
    assert [c.step for c in series] == steps


def test_a_checkpoint_folder_series_and_its_errors(tmp_path):
    for step in (500, 1000):
        (tmp_path / f"checkpoint-{step}").mkdir()
        write_lora(tmp_path / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors")
    assert [c.step for c in find_series([tmp_path])] == [500, 1000]
    (tmp_path / "checkpoint-1000" / "extra.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="extra.safetensors' is not a readable"):
        find_series([tmp_path])


def series(**tags: list[float]) -> dict[str, list[tuple[int, float]]]:
    steps = [0, 100, 200, 300]
    return {getattr(vm, name): list(zip(steps, values, strict=True))
            for name, values in tags.items()}


def test_the_choice_follows_the_rules():
    ctx = Context.of(1.0, {"min_steps": 0.0}, regime="finetune", fixed_points=True)
    base = {"Z_STD": [1.0] * 4}
    copies = series(COPY_SHARE=[0.0, 0.0, 0.5, 0.9], VAL_LOSS=[0.5, 0.4, 0.45, 0.5], **base)
    choice = choose(copies, ctx, [0, 100, 200, 300])
    assert choice.step == 100 and "which shows memorization" in choice.reason
    early = series(COPY_SHARE=[0.0, 0.6, 0.7, 0.9], VAL_LOSS=[0.5, 0.4, 0.45, 0.5], **base)
    assert choose(early, ctx, [0, 100, 200, 300]).step is None
    held = series(VAL_LOSS=[0.5, 0.30, 0.25, 0.28], VAL_TRAIN_LOSS=[0.5, 0.29, 0.24, 0.2],
                  **base)
    choice = choose(held, ctx, [0, 100, 200, 300])
    assert choice.step == 200 and "lowest held-out loss" in choice.reason
    flat = series(VAL_LOSS=[0.5, 0.499, 0.498, 0.4985], **base)
    choice = choose(flat, ctx, [0, 100, 200, 300])
    assert choice.step == 300 and "learned nothing" in choice.reason
