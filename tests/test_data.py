import gzip
import struct

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from ldmkit.config import DataConfig
from ldmkit.data.sources import BatchOrder, check_labels, load_data, source_digest
from ldmkit.errors import DataError


def test_digits_are_built_in_resized_and_in_unit_range():
    data = load_data(DataConfig(source="digits", image_size=32))
    assert data.images.shape == (1797, 1, 32, 32) and data.images.dtype == torch.uint8
    px = data.batch(torch.arange(100))
    assert px.min() >= -1 and px.max() <= 1 and px.min() == -1 and px.max() > 0.9
    assert data.labels is not None and set(data.labels.tolist()) == set(range(10))


def _write_png(path, size, mode="L", value=128):
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


def test_folder_resizes_center_crops_and_skips_corrupt_images(tmp_path):
    (tmp_path / "sub").mkdir()
    _write_png(tmp_path / "a.png", (40, 20))
    _write_png(tmp_path / "sub" / "b.jpg", (16, 16), mode="RGB")
    Image.new("RGB", (10, 30)).save(tmp_path / "c.webp")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = tmp_path / "truncated.jpg"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(good)
    good.write_bytes(good.read_bytes()[:200])
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_data(DataConfig(source="folder", path=str(tmp_path), image_size=8, channels=3))
    assert data.images.shape == (3, 3, 8, 8)
    assert data.skipped == 2
    assert data.first_skipped.endswith("broken.png")


def test_folder_with_no_readable_image_names_the_path(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=str(tmp_path)):
        load_data(DataConfig(source="folder", path=str(tmp_path)))
    with pytest.raises(DataError, match="not a directory"):
        load_data(DataConfig(source="folder", path=str(tmp_path / "missing")))


def _class_folders(root, per_class=2):
    for index, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _write_png(root / name / f"{i}.png", (8, 8), value=40 + 100 * index)
    return DataConfig(source="folder", path=str(root), image_size=8)


def test_hidden_files_and_folders_are_not_data_anywhere(tmp_path):
    """Jupyter leaves .ipynb_checkpoints beside every image it opened; macOS leaves .DS_Store
    and __MACOSX: not classes, not images, not part of the cache key, and counted."""
    cfg = _class_folders(tmp_path)
    before = source_digest(cfg)
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _write_png(tmp_path / ".ipynb_checkpoints" / "0-checkpoint.png", (8, 8))
    (tmp_path / "__MACOSX" / "cat").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "cat" / "._0.png").write_bytes(b"\0\5\22resource fork")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"Bud1")
    _write_png(tmp_path / "dog" / ".hidden.png", (8, 8))
    data = load_data(cfg)
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1, 1]
    assert data.names == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    assert (data.hidden, data.skipped) == (4, 0)
    assert source_digest(cfg) == before


def test_a_linked_class_folder_is_read_and_a_link_cycle_ends(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    _class_folders(elsewhere)
    root = tmp_path / "data"
    root.mkdir()
    (root / "cat").symlink_to(elsewhere / "cat", target_is_directory=True)
    (root / "dog").symlink_to(elsewhere / "dog", target_is_directory=True)
    (elsewhere / "dog" / "loop").symlink_to(root, target_is_directory=True)
    data = load_data(DataConfig(source="folder", path=str(root), image_size=8))
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1, 1]


def test_a_class_emptied_by_data_limit_blames_the_limit(tmp_path):
    cfg = _class_folders(tmp_path)
    cfg.limit = 2
    data = load_data(cfg)
    with pytest.raises(DataError, match="data.limit keeps the first 2 images.*'dog'"):
        check_labels(data.labels, data.classes, 2, data.source, data.limited_to)


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_with_labels(tmp_path):
    images = np.arange(5 * 28 * 28).reshape(5, 28, 28) % 256
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5]))
    data = load_data(DataConfig(source="idx", path=str(tmp_path), image_size=28))
    assert torch.equal(data.images[:, 0], torch.from_numpy(images.astype(np.uint8)))
    assert data.labels.tolist() == [3, 1, 4, 1, 5]


def test_truncated_idx_is_a_clear_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, 10, 28, 28) + b"\0" * 100)
    with pytest.raises(DataError, match="truncated"):
        load_data(DataConfig(source="idx", path=str(tmp_path)))


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="../shared/data/mnist absent")
def test_real_mnist_test_split():
    data = load_data(DataConfig(source="idx", path=str(SHARED_DATA / "mnist"), split="test",
                                image_size=32, limit=500))
    assert data.images.shape == (500, 1, 32, 32)
    assert data.labels.shape == (500,)


def test_batch_order_resumes_exactly():
    straight = BatchOrder(10, 4, seed=7)
    batches = [straight.next() for _ in range(7)]
    first = BatchOrder(10, 4, seed=7)
    for _ in range(3):
        first.next()
    resumed = BatchOrder(10, 4, seed=7, **first.state())
    assert all(torch.equal(resumed.next(), b) for b in batches[3:])
    epoch0 = torch.cat(batches)[:10]
    assert sorted(epoch0.tolist()) == list(range(10))  # each image once per epoch
