"""The caption of each image of a folder, in the two conventions practitioners use.

- A ``metadata.jsonl`` at the folder's root, one JSON object per line with ``file_name`` (the
  image's path below the root) and a caption column (``data.caption_column``, ``text`` by
  default): Hugging Face's ImageFolder (``datasets``' ``folder_based_builder``), which
  diffusers' ``train_text_to_image.py`` reads.
- A text file beside each image, its name the image's with ``data.caption_extension``
  (``photo.png`` -> ``photo.txt``): kohya sd-scripts (``--caption_extension``, default
  ``.caption``, ``.txt`` in its dataset configs), OneTrainer and ai-toolkit.

When the root holds a ``metadata.jsonl`` it alone is read. An image without a caption, an empty
or non-UTF-8 caption file, or a ``metadata.jsonl`` line that is not JSON or names no image of
the folder is a one-line DataError naming the file; with ``data.missing_caption: empty`` an image
without a caption trains on the empty caption instead, and the count is printed.
"""

from __future__ import annotations

import json
from pathlib import Path

from ldmkit.config import DataConfig
from ldmkit.errors import DataError
from ldmkit.platform.files import read_file

METADATA_FILE = "metadata.jsonl"
MAX_CAPTION_BYTES = 1 << 16  # a caption is a sentence or a tag list, never a file's worth


def _clean(raw: str, where: str) -> str:
    """One line of text: kohya and OneTrainer strip the caption and join its lines."""
    text = " ".join(line.strip() for line in raw.strip().splitlines() if line.strip())
    if not text:
        raise DataError(f"caption {where} is empty; write the image's caption in it, or delete "
                        "it and set data.missing_caption: empty")
    return text


def _from_metadata(root: Path, files: list[Path], column: str) -> dict[str, str]:
    path = root / METADATA_FILE
    try:
        lines = read_file(path).decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"'{path}' is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read '{path}' ({exc.strerror or exc}); fix its permissions") \
            from None
    known = {str(f) for f in files}
    found: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"'{path}' line {number}"
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{where} is not a JSON object; write one object per line with "
                            f"file_name and {column}") from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise DataError(f"{where} has no file_name; each line names its image "
                            "(its path below the folder)")
        name = str(Path(record["file_name"]))
        if name not in known:
            raise DataError(f"{where} names '{record['file_name'][:120]}', which is not an image "
                            f"of '{root}'; remove the line or add the image")
        caption = record.get(column)
        if not isinstance(caption, str):
            raise DataError(f"{where} has no text column '{column}' ({', '.join(record)[:120]}); "
                            "set data.caption_column to the column holding the caption")
        found[name] = _clean(caption, where)
    return found


def _from_files(root: Path, files: list[Path], extension: str) -> dict[str, str]:
    found = {}
    for name in files:
        path = (root / name).with_suffix(extension)
        if not path.is_file():
            continue
        size = path.stat().st_size
        if size > MAX_CAPTION_BYTES:
            raise DataError(f"caption '{path}' is {size} bytes; a caption is at most "
                            f"{MAX_CAPTION_BYTES} bytes: is it the right file?")
        try:
            found[str(name)] = _clean(read_file(path).decode("utf-8"), f"'{path}'")
        except UnicodeDecodeError:
            raise DataError(f"caption '{path}' is not UTF-8 text; save it as UTF-8") from None
    return found


def read_captions(root: Path, files: list[Path], cfg: DataConfig) -> list[str]:
    """The caption of each of ``files`` (paths below ``root``; "" for one without, under
    ``data.missing_caption: empty``), by ``metadata.jsonl`` when the root holds one, else by
    the caption file beside each image (``cfg``'s caption settings)."""
    metadata = (root / METADATA_FILE).is_file()
    found = (_from_metadata(root, files, cfg.caption_column) if metadata
             else _from_files(root, files, cfg.caption_extension))
    absent = [f for f in files if str(f) not in found]
    if absent and cfg.missing_caption == "error":
        where = (f"no line of '{root / METADATA_FILE}' names it" if metadata
                 else f"'{(root / absent[0]).with_suffix(cfg.caption_extension)}' does not exist")
        raise DataError(f"image '{root / absent[0]}' has no caption ({where}; {len(absent)} of "
                        f"{len(files)} images have none); caption it, or set "
                        "data.missing_caption: empty to train those on the empty caption")
    return [found.get(str(f), "") for f in files]
