"""Text-conditional models: what a caption costs per step, and what guidance buys on the emoji.

Run: ``.venv/bin/python benchmarks/text.py [cost] [emoji] [--run DIR]`` (both by default;
``--report`` re-renders BENCHMARKS.md from the saved results). Needs
``../shared/data/emoji-google``.

- ``cost``: one training step (forward, backward, AdamW) of the emoji UNet on 64 latents of
  4x16x16, class-conditional (``configs/emoji.yaml``'s model) against text-conditional
  (``configs/emoji-text.yaml``'s: the byte encoder and cross-attention, captions of 96 bytes),
  both on the fast path the text config's training chooses, alternated in one process, medians of
  ``ROUNDS`` rounds of ``STEPS`` steps; and one guided sampling call of each (scale 3).
- ``emoji``: ``ldmkit run configs/emoji-text.yaml`` as shipped, timed (or the finished run
  ``--run DIR``); its validation loss and overfitting gap at the end, the findings it raised;
  then prompt adherence: the captions of the images the run held out (never trained on
  verbatim), ``PER_PROMPT`` seeds each, at each of ``SCALES``; the share of samples the
  in-project emoji classifier puts in the caption's category (the image's folder), and the
  in-project image-text model's clip score and prompt retrieval. Their ceilings: the
  classifier's accuracy on those real held-out images, the image-text model's on its own.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mnist import ROOT, WORK  # noqa: E402
from report import machine, parts_cli, write_section  # noqa: E402
from throughput import step_fn  # noqa: E402

from ldmkit.conditioning.sources import TextSource  # noqa: E402
from ldmkit.config import from_dict, load_config  # noqa: E402
from ldmkit.data.captions import read_captions  # noqa: E402
from ldmkit.data.sources import list_folder, load_data  # noqa: E402
from ldmkit.diffusion.condition import LABELS, TOKENS  # noqa: E402
from ldmkit.diffusion.parameterization import parameterization_of  # noqa: E402
from ldmkit.models.registry import backbone_spec, build_backbone  # noqa: E402
from ldmkit.models.text import tokenize  # noqa: E402
from ldmkit.platform.fastpath import Compiled, choose  # noqa: E402
from ldmkit.run.context import read_run  # noqa: E402
from ldmkit.run.layout import RunDir  # noqa: E402
from ldmkit.sampling.classifier import load_or_train  # noqa: E402
from ldmkit.sampling.contrastive import load_or_train_image_text  # noqa: E402
from ldmkit.sampling.generate import generate  # noqa: E402
from ldmkit.sampling.trained import load_for_sampling  # noqa: E402
from ldmkit.vitals import metrics as vm  # noqa: E402
from ldmkit.vitals.logs.metrics_jsonl import json_objects  # noqa: E402

CLASS_CONFIG, TEXT_CONFIG = ROOT / "configs/emoji.yaml", ROOT / "configs/emoji-text.yaml"
RUN = ROOT / "runs/emoji-text"
RESULTS = WORK / "text.json"
BATCH, LATENT, ROUNDS, STEPS, CALLS = 64, (4, 16, 16), 5, 5, 10
SCALES = (1.0, 2.0, 3.0, 5.0, 8.0)
PER_PROMPT, SEED = 8, 1
PARTS = ("cost", "emoji")


def step_cost() -> dict[str, dict]:
    """Milliseconds per training step and per guided sampling call, class against text."""
    cfgs = {"class": load_config(CLASS_CONFIG), "text": load_config(TEXT_CONFIG)}
    data = cfgs["text"].data
    listing = list_folder(ROOT / data.path)
    captions = read_captions(listing.root, listing.files[:BATCH], data)
    conds = {"class": {LABELS: torch.arange(BATCH) % 8},
             "text": {TOKENS: tokenize(captions, cfgs["text"].model.text_max_length)}}
    calls, paths = {}, {}
    x, t = torch.randn(BATCH, *LATENT), torch.full((BATCH,), 0.5)
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        text = cfgs["text"].train  # one path for both: only the condition differs
        fast = choose(text.precision, text.compile, torch.device("cpu"), "train", text.steps)
        model = build_backbone(backbone_spec(cfg.model, LATENT[0], LATENT[1]))
        compiled, cond = Compiled(model, fast), conds[name]

        def run(net, x, t, fast=fast, **c):
            with fast.autocast():
                return net(x, t, **c)

        calls[f"step {name}"] = step_fn(
            model, False, lambda x, t, run=run, net=compiled, cond=cond: run(net, x, t, **cond),
            BATCH, LATENT)
        denoise = parameterization_of(cfg.diffusion).denoiser(
            lambda x, t, run=run, net=model, **c: run(net, x, t, **c), cond, 3.0)
        calls[f"sample {name}"] = torch.no_grad()(lambda denoise=denoise: denoise(x, t))
        paths[name] = fast.describe()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(2):  # warm-up, compilation included
        for call in calls.values():
            call()
    for _ in range(ROUNDS):
        for key, call in calls.items():
            repeat = STEPS if key.startswith("step") else CALLS
            start = time.perf_counter()
            for _ in range(repeat):
                call()
            times[key].append((time.perf_counter() - start) / repeat * 1e3)
    figures = {k: statistics.median(v) for k, v in times.items()}
    print(figures, paths, flush=True)
    return {"ms": figures, "paths": paths}


def emoji(run: Path | None) -> dict:
    """The shipped config end to end (timed) unless ``run`` is given, then the sweep."""
    wall = None
    if run is None:
        run, start = RUN, time.perf_counter()
        with (run.parent / "emoji-text.log").open("w") as log:
            subprocess.run([sys.executable, "-m", "ldmkit", "run", str(TEXT_CONFIG), "--set",
                            f"run_dir={run}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                           check=True)
        wall = time.perf_counter() - start
    series = read_run(run)[0].series
    val, train_loss = series[vm.VAL_LOSS][-1][1], series[vm.VAL_TRAIN_LOSS][-1][1]
    findings = RunDir(run).findings
    serious = sorted({r["code"] for r in (json_objects(findings) if findings.is_file() else ())
                      if r.get("event") == "raised"
                      and r.get("severity") in ("warning", "critical")})
    return {"wall_s": wall, "val_loss": val, "train_loss": train_loss,
            "gap": val / train_loss - 1, "serious": serious, "rows": sweep(run),
            "prompts": len(json.loads(RunDir(run).split_file.read_text())["held_out"]),
            "steps": series[vm.LOSS][-1][0]}


def sweep(run: Path) -> list[dict]:
    """Category accuracy of held-out captions' samples per guidance scale, and the ceiling."""
    trained = load_for_sampling(run)
    cfg = from_dict(trained.config)
    names = json.loads(RunDir(run).split_file.read_text())["held_out_names"]
    data = load_data(cfg.data, captions=True)  # the category of an image is its folder's label
    rows_of = {name: i for i, name in enumerate(data.names)}
    rows = torch.tensor([rows_of[n] for n in names])
    want = data.labels[rows]
    clf = load_or_train(cfg.data)[0]
    image_text = load_or_train_image_text(cfg.data)
    ceiling = (clf.embed(data.batch(rows))[1] == want).float().mean().item()
    source = TextSource(cfg.model.text_max_length)
    request = source.request(0, [data.captions[i] for i in rows.tolist()], PER_PROMPT)
    rows = [{"guidance": "real", "category_accuracy": ceiling, "within_prompt": None,
             "clip_score": image_text.real_clip_score,
             "prompt_retrieval": image_text.real_retrieval}]
    print(json.dumps(rows[-1]), flush=True)
    for g in SCALES:
        samples = generate(trained.model, trained.ae, trained.scale, cfg, len(request),
                           cfg.sample.sampler, cfg.sample.steps, SEED, request=request,
                           guidance=g)
        predicted = clf.embed(samples.images.float().div(127.5).sub(1))[1]
        adherence = image_text.metrics(samples.images, request.sample_names())
        rows.append({"guidance": g, "category_accuracy":
                     (predicted == want[request.groups]).float().mean().item(),
                     "within_prompt": samples.vitals.get(vm.WITHIN_PROMPT),
                     "clip_score": adherence[vm.EVAL_CLIP_SCORE],
                     "prompt_retrieval": adherence[vm.EVAL_PROMPT_RETRIEVAL]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def section(results: dict) -> str:
    parts = ["## Text-conditional models (`benchmarks/text.py`)\n",
             f"Machine: {results['machine']}. Command: `.venv/bin/python benchmarks/text.py`.\n"]
    if "cost" in results:
        ms = results["cost"]["ms"]
        table = "\n".join(
            f"| {what} | {ms[key + ' class']:.0f} ms | {ms[key + ' text']:.0f} ms | "
            f"{ms[key + ' text'] / ms[key + ' class']:.2f}x |"
            for what, key in (("training step", "step"),
                              ("guided sampling call (scale 3)", "sample")))
        parts.append(f"""The emoji UNet on {BATCH} latents of 4x16x16, class-conditional
(`configs/emoji.yaml`) against text-conditional (`configs/emoji-text.yaml`: the byte encoder of
width 128 and depth 2 over 96 bytes, cross-attention at 4x4 and in the middle block, the pooled
caption added to the time embedding), both on the fast path of the text config's training
({results['cost']['paths']['text']}), alternated in one process, medians of {ROUNDS} rounds.

| | class-conditional | text-conditional | ratio |
|---|---|---|---|
{table}
""")
    if "emoji" in results:
        e = results["emoji"]
        wall = f"**{e['wall_s'] / 60:.1f} minutes** end to end" if e["wall_s"] else "(timed apart)"
        rows = "\n".join(
            f"| {r['guidance'] if r['guidance'] == 'real' else format(r['guidance'], 'g')} | "
            f"{r['category_accuracy']:.3f} | {r['clip_score']:.3f} | {r['prompt_retrieval']:.3f} | "
            f"{'' if r['within_prompt'] is None else format(r['within_prompt'], '.3f')} |"
            for r in e["rows"])
        parts.append(f"""`ldmkit run configs/emoji-text.yaml` ({e['steps']} steps): {wall}; at the end the
held-out validation loss {e['val_loss']:.4f} against {e['train_loss']:.4f} on training images
(gap {e['gap']:+.1%}; the overfitting finding fires at +25 %); findings raised (warning or
critical): {', '.join(e['serious']) or 'none'}. Prompt adherence: the captions of the
{e['prompts']} held-out images (never trained on verbatim), {PER_PROMPT} seeds each, the
run's sampler; the share of samples the in-project classifier puts in the caption's category
(chance 0.125), and the in-project image-text model's (`sampling/contrastive.py`)
`eval/clip_score` (cosine of sample and caption) and `eval/prompt_retrieval` (share of samples
whose caption ranks first among 32 captions of the dataset; chance 0.031). Row "real": the
classifier on the held-out images themselves, and the image-text model on the images it held
out with their own captions: the level of a perfect model; guidance exaggerates what the
models key on and can pass it, as for the class-conditional emoji. Within-prompt diversity:
pairwise MSE of one prompt's samples (decoder latents; it does not fall with guidance here: no
collapse). One run, one seed.

| guidance | category accuracy | clip score | prompt retrieval | within-prompt pairwise MSE |
|---|---|---|---|---|
{rows}
""")
    return "\n".join(parts)


def main() -> None:
    args, results = parts_cli(__doc__, PARTS, RESULTS, lambda parser: parser.add_argument(
        "--run", type=Path, help="emoji: a finished run of the config"))
    if not args.report:
        results["machine"] = machine()
        if "cost" in args.parts:
            results["cost"] = step_cost()
        if "emoji" in args.parts:
            timed = results.get("emoji", {}).get("wall_s")
            results["emoji"] = emoji(args.run)
            if args.run is not None:  # the run as timed when the benchmark trained it
                results["emoji"]["wall_s"] = timed
        WORK.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2))
    write_section("text", section(results))


if __name__ == "__main__":
    main()
