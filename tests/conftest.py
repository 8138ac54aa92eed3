"""Shared fixtures: a tiny experiment that trains end to end in seconds on 2 CPU cores, and
one finished run of it that every test which only reads a healthy run shares (a test that
changes a run copies it first: ``copy_run``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from ldmkit.config import Config, from_dict

# nothing in the suite may download: Hugging Face code fails instead of reaching the network
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY = {
    "name": "tiny",
    "seed": 0,
    "tensorboard": False,
    "data": {"source": "digits", "image_size": 16, "limit": 256},
    "autoencoder": {"base_channels": 8, "channel_mult": [1, 2, 2], "steps": 30,
                    "batch_size": 32, "log_every": 10, "calibration_batches": 4},
    "model": {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [2]},
    # fp32: bf16 autocast costs these tiny models more than it saves (18 % slower end to end
    # on an avx512_bf16 CPU); the bf16 fast path has its own tests (test_fastpath.py)
    "train": {"steps": 12, "batch_size": 16, "warmup_steps": 2, "log_every": 4,
              "sample_every": 6, "checkpoint_every": 4, "precision": "fp32"},
    "sample": {"num": 8, "steps": 4, "during_training_num": 4},
}


def tiny_config(**sections: dict) -> Config:
    """TINY with some keys replaced, e.g. ``tiny_config(train={"steps": 20})``; a ``model``
    with a ``type`` replaces the tiny UNet."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for name, values in sections.items():
        if isinstance(values, dict) and not (name == "model" and "type" in values):
            data[name] = {**data.get(name, {}), **values}
        else:
            data[name] = values
    return from_dict(data)


@pytest.fixture
def tiny() -> Config:
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``TINY`` trained as it is (12 steps, stage 1 included): read it, never change it."""
    from ldmkit.training.loop import train

    return train(tiny_config(), tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture(scope="session")
def ae_digits(tmp_path_factory) -> str:
    """The fault and conditioning tests' stage 1 (``test_faults.BASE``), trained once."""
    from test_faults import train_autoencoder

    return train_autoencoder(tmp_path_factory.mktemp("ae") / "digits")


@pytest.fixture(scope="session")
def digits_captioned(tmp_path_factory) -> Path:
    """The first 512 scikit-learn digits as a captioned folder (``test_text.digits_folder``)."""
    from test_text import digits_folder

    return digits_folder(tmp_path_factory.mktemp("captioned") / "digits")


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of a finished run for a test that changes it: links, modes and times as they
    are (``cp -a``)."""
    subprocess.run(["cp", "-a", str(run), str(dest)], check=True)
    return dest


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The in-project classifier's cache in this session's (this worker's) temporary folder:
    tests never write into the user's ``~/.cache``, and parallel workers never share one."""
    previous = os.environ.get("LDMKIT_CACHE")
    os.environ["LDMKIT_CACHE"] = str(tmp_path_factory.mktemp("ldmkit-cache"))
    yield
    if previous is None:
        os.environ.pop("LDMKIT_CACHE", None)
    else:
        os.environ["LDMKIT_CACHE"] = previous


def pytest_collection_modifyitems(config, items):
    """Slow tests first (in file order), so that parallel workers (``make test`` runs two) end
    together instead of one finishing a long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
