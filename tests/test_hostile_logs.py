"""The log readers are parsers of untrusted input: hostile or damaged content (nesting deeper
than any parser's recursion, values of the wrong type, non-finite steps, FIFOs where files are
expected) ends in a one-line error naming the file, exit 2, or in a result that says what was
skipped; never a traceback, never a hang."""

from __future__ import annotations

import json
import os
import signal
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from ldmkit.cli import main

DEEP = 100_000
DEEP_JSON = "[" * DEEP + "]" * DEEP
DEEP_YAML = "[" * DEEP + "]" * DEEP
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)) \
    + "pretrained_model_name_or_path: *i\n"  # 10^9 values once expanded
HEALTHY = [{"step": s, "tag": "loss/total_loss", "value": 0.5 - s / 1000} for s in range(1, 40)]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


def diagnose(path: Path, capsys, seconds: int = 20) -> tuple[int, str]:
    """``ldmkit diagnose PATH``'s exit code and stderr; a read that blocks fails the test."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        code = main(["diagnose", str(path)])
    except Hang:
        pytest.fail(f"ldmkit diagnose {path} blocked for {seconds} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, capsys.readouterr().err


def refused(code: int, err: str, culprit: Path | str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ldmkit: error:"), err
    assert str(culprit) in lines[0], err


def jsonl(path: Path, rows: list, extra: str | None = None, at: int = 3) -> Path:
    lines = [json.dumps(r) for r in rows]
    if extra is not None:
        lines.insert(at, extra)
    path.write_text("\n".join(lines) + "\n")
    return path


def wandb_run(tmp: Path) -> Path:
    files = tmp / "wandb" / "run-20261125_120000-abc123" / "files"
    files.mkdir(parents=True)
    jsonl(files / "wandb-history.jsonl", [{"_step": s, "loss": 0.5 - s / 1000} for s in range(40)])
    (files / "config.yaml").write_text(yaml.safe_dump({"lr": {"desc": None, "value": 1e-4}}))
    return files


def transaction_log(path: Path, records: list) -> Path:
    """A ``run-<id>.wandb`` file: the header, then each protobuf Record framed as LevelDB's log
    format frames it (32 KiB blocks, a record split FIRST/MIDDLE/LAST across them; the reader
    does not check the CRC)."""
    out = bytearray(b":W&B" + b"\xbe\xef\x00")
    for message in records:
        payload, first = message.SerializeToString(), True
        while True:
            left = 32768 - len(out) % 32768
            if left < 7:
                out += b"\0" * left
                continue
            chunk, payload = payload[:left - 7], payload[left - 7:]
            kind = (1 if not payload else 2) if first else (4 if not payload else 3)
            out += struct.pack("<IHB", 0, len(chunk), kind) + chunk
            first = False
            if not payload:
                break
    path.write_bytes(bytes(out))
    return path


def history(step_json: str | None, items: dict[str, str], step: int = 0):
    from wandb.proto import wandb_internal_pb2

    record = wandb_internal_pb2.Record()
    record.history.step.num = step
    for key, value_json in items.items():
        item = record.history.item.add()
        item.key, item.value_json = key, value_json
    if step_json is not None:
        item = record.history.item.add()
        item.key, item.value_json = "_step", step_json
    return record


def config_record(value_json: str):
    from wandb.proto import wandb_internal_pb2

    record = wandb_internal_pb2.Record()
    item = record.config.update.add()
    item.key, item.value_json = "lr", value_json
    return record


def mlflow_run(root: Path, name: str, start_time) -> Path:
    run = root / "0" / name
    (run / "metrics").mkdir(parents=True)
    (run / "params").mkdir()
    (run / "meta.yaml").write_text(yaml.safe_dump({"run_id": name, "start_time": start_time}))
    (run / "metrics" / "train_loss").write_text(
        "".join(f"1700000000 {0.5 - s / 1000} {s}\n" for s in range(1, 40)))
    (run / "params" / "learning_rate").write_text("1e-4")
    return run


def tensorboard(directory: Path) -> Path:
    with SummaryWriter(str(directory)) as writer:
        for s in range(1, 40):
            writer.add_scalar("loss", 0.5 - s / 1000, s)
    return directory


HOSTILE: dict[str, Callable[[Path], tuple[Path, Path]]] = {
    # (what to diagnose, the file the error must name)
    "jsonl-deep": lambda t: (p := jsonl(t / "metrics.jsonl", HEALTHY,
                                        '{"step": 4, "tag": "loss", "value": ' + DEEP_JSON + "}"), p),
    "wandb-history-deep": lambda t: (t / "wandb", jsonl(
        wandb_run(t) / "wandb-history.jsonl", [{"_step": s, "loss": 0.4} for s in range(40)],
        '{"_step": 3, "loss": ' + DEEP_JSON + "}")),
    "wandb-history-step-text": lambda t: (t / "wandb", jsonl(
        wandb_run(t) / "wandb-history.jsonl", [{"_step": s, "loss": 0.4} for s in range(40)],
        '{"_step": "abc", "loss": 0.4}')),
    "wandb-history-step-infinite": lambda t: (t / "wandb", jsonl(
        wandb_run(t) / "wandb-history.jsonl", [{"_step": s, "loss": 0.4} for s in range(40)],
        '{"_step": Infinity, "loss": 0.4}')),
    "wandb-config-deep": lambda t: (t / "wandb", _write(wandb_run(t) / "config.yaml",
                                                        "lr: " + DEEP_YAML)),
    "wandb-config-wrong-type": lambda t: (t / "wandb", _write(wandb_run(t) / "config.yaml",
                                                              "- just\n- a list\n")),
    "mlflow-start-time-list": lambda t: (t / "mlruns", _two_mlflow_runs(t, [1, 2])),
    "mlflow-start-time-text": lambda t: (t / "mlruns", _two_mlflow_runs(t, "yesterday")),
    "mlflow-meta-deep": lambda t: (t / "mlruns", _write(
        mlflow_run(t / "mlruns", "a", 1) / "meta.yaml", "start_time: " + DEEP_YAML)),
    "mlflow-params-wrong-type": lambda t: (t / "mlruns", _write(
        mlflow_run(t / "mlruns", "a", 1) / "params" / "learning_rate", "[1, 2]")),
    "tensorboard-hparams-deep": lambda t: (tensorboard(t / "tb"), _write(
        t / "tb" / "hparams.yml", "learning_rate: " + DEEP_YAML)),
    "tensorboard-hparams-billion-laughs": lambda t: (tensorboard(t / "tb"), _write(
        t / "tb" / "hparams.yml", LAUGHS)),
    "wandb-config-huge": lambda t: (t / "wandb", _write(wandb_run(t) / "config.yaml",
                                                        "a: '" + "x" * (17 << 20) + "'\n")),
}
WANDB_LOG: dict[str, list] = {
    "step-text": [history('"abc"', {"loss": "0.4"})],
    "step-infinite": [history("Infinity", {"loss": "0.4"})],
    "value-not-json": [history(None, {"loss": "{not json"})],
    "value-deep": [history(None, {"loss": DEEP_JSON})],
    "config-not-json": [config_record("{not json")],
    "config-deep": [config_record(DEEP_JSON)],
}


def _two_mlflow_runs(tmp: Path, start_time) -> Path:
    """Two runs, so the newest is chosen by ``start_time``; the second's is of a wrong type."""
    mlflow_run(tmp / "mlruns", "a", 1)
    return _write(mlflow_run(tmp / "mlruns", "b", 2) / "meta.yaml",
                  yaml.safe_dump({"start_time": start_time}))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_content_is_a_one_line_error_or_a_result(tmp_path, capsys, case):
    target, culprit = HOSTILE[case](tmp_path)
    code, err = diagnose(target, capsys)
    if code == 2:
        refused(code, err, culprit)
    else:
        assert code in (0, 1) and "Traceback" not in err, err


@pytest.mark.parametrize("case", sorted(WANDB_LOG))
def test_a_bad_wandb_record_is_skipped_and_said(tmp_path, capsys, case):
    """One undecodable record among good ones: the rest is read, and the diagnosis says how
    many records it skipped and where the first was."""
    good = [history(None, {"loss": str(0.5 - s / 1000)}, step=s) for s in range(1, 40)]
    path = transaction_log(tmp_path / "run-abc.wandb", good[:5] + WANDB_LOG[case] + good[5:])
    code = main(["diagnose", str(path)])
    out = capsys.readouterr().out
    assert code in (0, 1) and "skipped 1 W&B record" in out and "record 6" in out, out


FIFO_NAMES = ["metrics.jsonl", "log.csv", "events.out.tfevents.1.host", "run-abc.wandb",
              "wandb-history.jsonl"]


@pytest.mark.parametrize("name", FIFO_NAMES)
def test_a_fifo_where_a_log_is_expected_is_refused_not_waited_on(tmp_path, capsys, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    refused(*diagnose(fifo, capsys), fifo)
    if name.startswith("events"):  # TensorBoard reads a directory's files itself
        refused(*diagnose(tmp_path, capsys), fifo)


def test_a_fifo_named_like_a_runs_log_is_refused_in_a_directory(tmp_path, capsys):
    os.mkfifo(tmp_path / "metrics.jsonl")
    refused(*diagnose(tmp_path, capsys), tmp_path / "metrics.jsonl")


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path, capsys):
    """Excel and PowerShell write UTF-8 CSVs with a BOM before the header."""
    path = tmp_path / "loss.csv"
    rows = "".join(f"{s},{0.5 - s / 1000}\n" for s in range(1, 40))
    path.write_bytes("\ufeffstep,loss\n".encode() + rows.encode())
    code, err = diagnose(path, capsys)
    assert code in (0, 1), err


def test_a_tensorboard_file_damaged_mid_file_says_where_reading_stopped(tmp_path, capsys):
    """TensorBoard's reader stops at a record that fails its checksum without a word; the
    diagnosis says so, with the byte, instead of judging half a log as the whole."""
    directory = tensorboard(tmp_path / "tb")
    (file,) = directory.glob("events.out.tfevents.*")
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    file.write_bytes(bytes(data))
    code, err = diagnose(directory, capsys)
    assert code in (0, 1), err
    main(["diagnose", str(directory)])
    out = capsys.readouterr().out
    assert f"'{file}' is damaged at byte" in out and "read up to there" in out


def test_thousands_of_event_files_are_read_without_listing_them_each_time(tmp_path, capsys):
    """A directory of 5,000 event files (a run restarted every few steps, or a flood of empty
    ones) is read file by file: TensorBoard's own directory reading lists it once per file."""
    directory = tmp_path / "tb"
    directory.mkdir()
    for i in range(5000):
        (directory / f"events.out.tfevents.{i:05d}.host").write_bytes(b"")
    refused(*diagnose(directory, capsys, seconds=60), "all empty")
    tensorboard(directory)  # one real log among them
    code, err = diagnose(directory, capsys, seconds=60)
    assert code in (0, 1), err
