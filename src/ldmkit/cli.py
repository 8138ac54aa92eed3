"""Command line: maps ``ldmkit <command>`` to library functions, nothing more."""

from __future__ import annotations

import argparse
import sys

from ldmkit.config import SAMPLERS
from ldmkit.diffusion.registry import OBJECTIVE_NAMES
from ldmkit.errors import LdmkitError
from ldmkit.platform.preemption import Preempted
from ldmkit.vitals.logs.sources import formats_text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldmkit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    overrides = {"action": "append", "default": [], "metavar": "SECTION.KEY=VALUE",
                 "help": "override a config key, e.g. --set train.lr=3e-4 (repeatable)"}

    run = sub.add_parser("run", help="the whole job: autoencoder, calibration, diffusion, "
                         "samples, report")
    run.add_argument("config", help="experiment YAML, e.g. configs/digits.yaml")
    run.add_argument("--set", dest="overrides", **overrides)

    train = sub.add_parser("train", help="train (stage 1 if needed, then stage 2), or resume")
    train.add_argument("config", nargs="?", help="experiment YAML (not with --resume)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last "
                       "checkpoint")
    train.add_argument("--set", dest="overrides", **overrides)
    train.add_argument("--until", type=int, metavar="STEP", help="stop at this step with a "
                       "checkpoint (time-sliced jobs); continue later with --resume")

    encode = sub.add_parser("encode", help="encode a run's dataset into its latent cache once")
    encode.add_argument("run_dir")
    encode.add_argument("--out", help="cache directory (default: the run's data.latent_cache, "
                        "or RUN_DIR/latents)")

    sample = sub.add_parser("sample", help="sample a trained run with its EMA weights")
    sample.add_argument("run_dir")
    sample.add_argument("--num", type=int, default=64)
    sample.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    sample.add_argument("--steps", type=int, default=50)
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", help="output directory (default RUN_DIR/samples/...)")
    sample.add_argument("--class", dest="choice", metavar="CLASS",
                        help="class-conditional models: a class index or folder name, or all "
                             "(one grid row per class); default: every class in turn")
    sample.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                        help="text-conditional models: a prompt (repeat for more), --num "
                             "samples each, a grid row per prompt; default: the run's prompts")
    sample.add_argument("--prompts", dest="prompt_file", metavar="FILE",
                        help="text-conditional models: a UTF-8 file of prompts, one per line")
    sample.add_argument("--guidance", type=float, metavar="SCALE",
                        help="classifier-free guidance scale (1: none; default: the run's "
                             "sample.guidance_scale)")

    report = sub.add_parser("report", help="write a run's self-contained HTML report")
    report.add_argument("run_dir")
    report.add_argument("-o", "--out", help="output file (default RUN_DIR/report.html)")

    evaluate = sub.add_parser("eval", help="sample quality: FD, precision/recall, class "
                              "coverage, memorization (logged as eval/*)")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--num", type=int, default=1000)
    evaluate.add_argument("--sampler", choices=SAMPLERS)
    evaluate.add_argument("--steps", type=int)
    evaluate.add_argument("--guidance", type=_scales, metavar="G1,G2,...",
                          help="class-conditional models: classifier-free guidance scales to "
                               "evaluate, e.g. 1,2,4,8 (default: the run's sample.guidance_scale)")

    export = sub.add_parser("export", help="write a run as diffusers model directories")
    export.add_argument("run_dir")
    export.add_argument("out")

    watch = sub.add_parser("watch", help="live terminal view of a running run's vital signs")
    watch.add_argument("run_dir")
    watch.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    watch.add_argument("--once", action="store_true", help="print one frame and exit")

    fix = sub.add_parser("fix", help="apply the automatic remedies of a run's findings and "
                         "continue or restart it")
    fix.add_argument("run_dir")
    fix.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    fix.add_argument("--steps", type=int, metavar="N", help="train.steps of the fixed run "
                     "(default: the run's, or a full window of log records past the checkpoint "
                     "it continues from)")

    diagnose = sub.add_parser("diagnose", help="read any run's metrics and say what is wrong")
    diagnose.add_argument("path", help="an ldmkit run, or another trainer's log, or the "
                          f"folder holding it: {formats_text()}")
    diagnose.add_argument("--json", action="store_true", help="machine-readable output")
    diagnose.add_argument("--fail-on", choices=("never", "warning", "critical"),
                          default="critical", help="exit 1 when a finding this severe is present")
    diagnose.add_argument("--objective", choices=OBJECTIVE_NAMES, default=None,
                          help="what the logged loss regresses (read from a run's config when "
                               "there is one): flow's loss starts at 2, the others' at 1")
    diagnose.add_argument("--mode", choices=("pretrain", "finetune"), default=None,
                          help="training from scratch or fine-tuning (read from the run's config "
                               "or log otherwise): a fine-tune's low, flat loss is expected")
    diagnose.add_argument("--latent-scale-factor", type=float, default=None,
                          help="the run's scale, when its log does not hold latent/scale_factor")
    probe = sub.add_parser("probe", help="the vital signs of a diffusers pipeline and its "
                           "LoRAs or fine-tuned checkpoints, and which checkpoint to keep")
    probe.add_argument("base", help="a local diffusers pipeline directory (model_index.json): "
                       "Stable Diffusion 1.x/2.x/XL, SD3, Flux")
    probe.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                       help="LoRA or model .safetensors files, checkpoint folders, or the folder "
                       "holding a series (none: the base alone)")
    probe.add_argument("--data", required=True, help="the training images with their captions "
                       "(.txt beside each image, or metadata.jsonl)")
    probe.add_argument("--holdout", help="captioned images the run did not train on")
    probe.add_argument("--out", help="the probe directory (default: ./probe_<name>)")
    for name, default, what in (("points", 200, "fixed (image, noise level, noise) points"),
                                ("prompts", 4, "training captions sampled"),
                                ("seeds", 4, "samples per prompt"),
                                ("steps", 20, "sampling steps"), ("batch", 8, "batch size"),
                                ("seed", 0, "seed of the fixed draws")):
        probe.add_argument(f"--{name}", type=int, default=default, help=f"{what} ({default})")
    probe.add_argument("--guidance", type=float, help="guidance scale (default: 7.5 for SD, "
                       "7 for SD3, 3.5 for Flux)")
    probe.add_argument("--resolution", type=int, help="image size (default: the pipeline's)")
    probe.add_argument("--dtype", default="auto", help="auto (bf16/fp16 on a GPU, fp32 on a "
                       "CPU), fp32, bf16, fp16")
    probe.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    probe.add_argument("--caption-extension", default=".txt",
                       help="the caption files' extension (.txt)")
    return p


def _probe(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ldmkit.probe.run import ProbeOptions, probe
    from ldmkit.report import write_html_report

    options = ProbeOptions(args.points, args.prompts, args.seeds, args.steps, args.guidance,
                           args.resolution, args.batch, args.dtype, args.device, args.seed,
                           args.caption_extension)
    result = probe(Path(args.base), Path(args.data), [Path(c) for c in args.checkpoints],
                   Path(args.holdout) if args.holdout else None,
                   Path(args.out) if args.out else None, options)
    print(result.choice.reason)
    print(f"probe: {result.out}; report: {write_html_report(result.out)}")


def _train(args: argparse.Namespace, report: bool) -> int:
    from ldmkit.config import load_config
    from ldmkit.jobs.pipeline import train_and_report
    from ldmkit.run.layout import RunDir

    until = getattr(args, "until", None)
    if until is not None and until < 1:
        raise LdmkitError("--until must be a step >= 1")
    if args.command == "train" and args.resume:
        if args.config:
            raise LdmkitError("give either a config or --resume RUN_DIR, not both")
        done = train_and_report(RunDir(args.resume).load_config(args.overrides), args.resume,
                                resume=True, stop_at=until)
    elif not args.config:
        raise LdmkitError("missing config: ldmkit train configs/digits.yaml")
    else:
        done = train_and_report(load_config(args.config, args.overrides), stop_at=until)
    result = done.result
    if done.summary is None:
        return 0
    if report and not result.preempted_by:
        print(done.summary)
    else:
        print(f"trained {result.step} steps; scenario: {result.verdict}; "
              f"run directory: {result.run_dir}; report: {done.html}")
    return 1 if result.stopped_by else 0


def _fix(args: argparse.Namespace) -> int:
    from ldmkit.jobs.fix import apply_fix, describe, plan_fix, repair
    from ldmkit.jobs.pipeline import report
    from ldmkit.run.layout import RunDir

    if args.steps is not None and args.steps < 1:
        raise LdmkitError("--steps must be a step count >= 1")
    plan = plan_fix(args.run_dir, args.steps)
    print(describe(plan))
    result = None if args.dry_run else apply_fix(plan)
    if result is None:
        return 0
    done = report(repair(result, RunDir(result.run_dir).load_config()))
    if done.summary is not None and not done.result.preempted_by:
        print(done.summary)
    return 1 if done.result.stopped_by else 0


def _scales(text: str) -> list[float]:
    """``--guidance 1,2,4``: numbers (their bounds are ``sample.guidance_scale``'s)."""
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a comma-separated list of "
                                         "numbers, e.g. 1,2,4,8") from None


def _sample(args: argparse.Namespace) -> None:
    from ldmkit.conditioning.sources import read_prompts
    from ldmkit.sampling.generate import sample_run

    prompts = (args.prompts or []) + (read_prompts(args.prompt_file) if args.prompt_file else [])
    grid, samples = sample_run(args.run_dir, args.num, args.sampler, args.steps, args.seed,
                               args.eta, args.out, args.choice, args.guidance, prompts or None)
    for tag, value in samples.vitals.items():
        print(f"{tag}: {value:.4g}")
    print(f"samples: {grid}")


def _encode(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ldmkit.data.latents import encode_run

    path = encode_run(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"latent cache: {path}")


def _diagnose(args: argparse.Namespace) -> int:
    from ldmkit.run.context import diagnose_path
    from ldmkit.vitals.monitor import SEVERITY_RANK
    from ldmkit.vitals.offline import format_table

    diagnosis = diagnose_path(args.path, args.latent_scale_factor, objective=args.objective,
                              mode=args.mode)
    print(diagnosis.to_json() if args.json else format_table(diagnosis))
    if args.fail_on != "never" and diagnosis.worst() >= SEVERITY_RANK[args.fail_on]:
        return 1
    return 0


OUT_OF_MEMORY = {  # what to lower, by command
    "train": "lower train.batch_size, data.image_size or the model's base_channels",
    "run": "lower train.batch_size, data.image_size or the model's base_channels",
    "sample": "sample fewer images (--num)",
    "eval": "evaluate on fewer samples (--num)",
    "encode": "lower data.image_size or data.limit",
    "diagnose": "the log is larger than this machine's memory: pass a part of it",
    "report": "the run's log is larger than this machine's memory",
    "watch": "the run's log is larger than this machine's memory",
    "export": "export on a machine with more memory",
    "fix": "lower train.batch_size, data.image_size or the model's base_channels",
    "probe": "lower --batch or --resolution",
}


def _error(text: str) -> None:
    """The one line every failure ends in: line breaks a message carries (a class folder's
    name, a value from a file) are shown escaped, never as a second line."""
    print("ldmkit: error: " + text.replace("\r", "\\r").replace("\n", "\\n"),
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("run", "train"):
            return _train(args, report=args.command == "run")
        if args.command == "sample":
            _sample(args)
        elif args.command == "report":
            from ldmkit.report import write_html_report

            print(f"report: {write_html_report(args.run_dir, args.out)}")
        elif args.command == "eval":
            from ldmkit.sampling.evaluate import eval_run

            for tag, value in eval_run(args.run_dir, args.num, args.sampler, args.steps,
                                       guidance=args.guidance).items():
                print(f"{tag}: {value:.4g}")
        elif args.command == "export":
            from pathlib import Path

            from ldmkit.platform.files import check_output
            from ldmkit.sampling.export import export_diffusers

            check_output(Path(args.out), "OUT", directory=True)
            print(f"exported: {export_diffusers(args.run_dir, args.out)}")
        elif args.command == "watch":
            from ldmkit.report.watch import watch

            watch(args.run_dir, args.interval, args.once)
        elif args.command == "encode":
            _encode(args)
        elif args.command == "diagnose":
            return _diagnose(args)
        elif args.command == "fix":
            return _fix(args)
        elif args.command == "probe":
            _probe(args)
    except LdmkitError as exc:
        _error(str(exc))
        return 2
    except OSError as exc:  # a read-only directory, a full disk, a path that is not a directory
        where = f"'{exc.filename}': " if exc.filename else ""
        _error(f"{where}{exc.strerror or exc}; check that the path exists, is writable and has "
               "free space (files saved before are intact)")
        return 2
    except MemoryError:
        _error(f"out of memory; {OUT_OF_MEMORY.get(args.command, OUT_OF_MEMORY['train'])} "
               "(files saved before are intact)")
        return 2
    except Preempted as exc:
        print(f"ldmkit: {exc}: stopped; files saved before are intact", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("ldmkit: interrupted; checkpoints already written are intact", file=sys.stderr)
        return 130
    return 0
