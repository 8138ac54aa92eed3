"""Property-based tests: random input to every parser a user feeds ends in a result or in
ldmkit's one-line error (``LdmkitError``), never in another exception."""

from __future__ import annotations

import contextlib
import io
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldmkit.config import Config, from_dict, load_config
from ldmkit.data.sources import load_data
from ldmkit.errors import LdmkitError
from ldmkit.vitals.logs.readers import read_log

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

SECTIONS = {"data": ["source", "path", "image_size", "channels", "limit"],
            "train": ["steps", "lr", "grad_clip", "log_every", "betas", "warmup_steps"],
            "diffusion": ["latent_scale_factor", "t_sampling", "logsnr_min", "logsnr_max"],
            "vitals": ["on_critical", "on_nonfinite", "thresholds", "max_rollbacks"],
            "model": ["type", "channel_mult", "base_channels", "depth"], "unet": ["channel_mult"],
            "bogus": ["x"]}
scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
sections = st.sampled_from(sorted(SECTIONS)).flatmap(
    lambda name: st.tuples(st.just(name), st.dictionaries(
        st.sampled_from(SECTIONS[name] + ["typo"]), values, max_size=3)))


@FAST
@given(st.lists(sections, max_size=4), st.one_of(st.none(), values))
def test_config_from_random_mappings(parts, top):
    data: dict = {name: body for name, body in parts}
    if top is not None:
        data["seed"] = top
    try:
        assert isinstance(from_dict(data), Config)
    except LdmkitError as exc:
        assert "\n" not in str(exc)


@FAST
@given(st.text(alphabet=string.printable, max_size=300))
def test_config_from_random_yaml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    with contextlib.suppress(LdmkitError):
        load_config(path)


def _records() -> st.SearchStrategy:
    record = st.fixed_dictionaries({"step": st.integers(-5, 10**9) | st.text(max_size=3),
                                    "tag": st.sampled_from(["loss/total_loss", "loss", "x"]),
                                    "value": st.floats() | st.text(max_size=4) | st.none()})
    return st.lists(record.map(lambda r: yaml.safe_dump(r, default_flow_style=True).strip()),
                    max_size=8)


@pytest.mark.parametrize("name", ["metrics.jsonl", "log.csv", "events.out.tfevents.1.host"])
@FAST
@given(content=st.binary(max_size=400))
def test_readers_on_random_bytes(tmp_path_factory, name, content):
    path = tmp_path_factory.mktemp("log") / name
    path.write_bytes(content)
    try:
        read_log(path)
    except LdmkitError as exc:
        assert "\n" not in str(exc)


@FAST
@given(lines=_records(), torn=st.text(max_size=20))
def test_jsonl_reader_on_random_records(tmp_path_factory, lines, torn):
    path = tmp_path_factory.mktemp("log") / "metrics.jsonl"
    path.write_text("\n".join([*lines, torn]))
    with contextlib.suppress(LdmkitError):
        read_log(path)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (12, 12), 90).save(buf, format="PNG")
    return buf.getvalue()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blobs=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
       keep_valid=st.booleans(), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]))
def test_image_loader_on_random_bytes(tmp_path_factory, blobs, keep_valid, prefix):
    from ldmkit.config import DataConfig

    folder: Path = tmp_path_factory.mktemp("imgs")
    for i, blob in enumerate(blobs):
        (folder / f"{i}.png").write_bytes(prefix + blob)
    if keep_valid:
        (folder / "valid.png").write_bytes(_png())
    try:
        data = load_data(DataConfig(source="folder", path=str(folder), image_size=8))
    except LdmkitError as exc:
        assert not keep_valid and str(folder) in str(exc)
        return
    assert len(data) + data.skipped == len(blobs) + keep_valid
    assert data.images.shape[1:] == (1, 8, 8)


@FAST
@given(header=st.binary(min_size=0, max_size=24), body=st.binary(max_size=64),
       labels=st.none() | st.binary(max_size=24))
def test_idx_reader_on_random_headers(tmp_path_factory, header, body, labels):
    from ldmkit.config import DataConfig

    folder: Path = tmp_path_factory.mktemp("idx")
    (folder / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08" + header + body)
    if labels is not None:
        (folder / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + labels)
    try:
        data = load_data(DataConfig(source="idx", path=str(folder), image_size=8))
    except LdmkitError as exc:
        assert "\n" not in str(exc)
        return
    assert data.images.shape[1:] == (1, 8, 8) and len(data) > 0
