"""How ldmkit writes files: atomically, never through a link, never over what it did not make.

Every directory ldmkit replaces as a whole (a checkpoint, the autoencoder, a latent cache, a
classifier cache) is written to a fresh temporary directory, fsynced and renamed into place, and
carries an owner file naming its kind. An existing directory is replaced or removed only when
it is ldmkit's own: it has that owner file, or it was made before owner files existed and holds
nothing but the files ldmkit writes there. Anything else (an image folder, a home directory, a
run directory given as a cache) is refused with a one-line error, so no setting can make
ldmkit delete a user's data.

Single files inside a run are written through a temporary file and ``os.replace`` (which
replaces a link rather than writing through it) or opened with ``O_NOFOLLOW``.

Only regular files are read or appended to: a FIFO where a log is expected would block the
reader forever, a device would never end. Files are opened with ``O_NONBLOCK`` (a FIFO then
opens at once instead of waiting for a writer) and checked with ``fstat`` before a byte is read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from safetensors import SafetensorError

from ldmkit.errors import CheckpointError, LdmkitError

if TYPE_CHECKING:
    import torch

OWNER_FILE = ".ldmkit"
# what each kind of directory held before owner files existed (runs made by ldmkit <= 0.1)
LEGACY_FILES: dict[str, frozenset[str]] = {
    "checkpoint": frozenset({"weights.safetensors", "training.safetensors", "meta.json"}),
    "autoencoder": frozenset({"weights.safetensors", "meta.json", "reconstructions.png"}),
    "latent_cache": frozenset({"meta.json", "mean.npy", "logvar.npy", "labels.npy"}),
    "classifier": frozenset({"weights.safetensors", "meta.json"}),
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; what ldmkit writes gets the modes a plain
# open()/mkdir() would give, so colleagues and TensorBoard servers can read a run as before
FILE_MODE, DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


class LinkRefused(LdmkitError):
    """A symbolic link where ldmkit reads or writes a run's files."""


def is_hidden(name: str) -> bool:
    """Names that are never a user's data or logs: dot files and folders
    (``.ipynb_checkpoints``, ``.DS_Store``, ``.git``) and the resource forks macOS puts into
    zip files (``__MACOSX``)."""
    return name.startswith(".") or name == "__MACOSX"


class NotRegular(LdmkitError):
    """A FIFO, socket or device where ldmkit expects a file."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _not_regular(path: Path, mode: int) -> NotRegular:
    return NotRegular(f"'{path}' is {_kind(mode)}, not a regular file; ldmkit reads only "
                      "regular files: replace it with the file itself")


def check_regular(path: Path) -> None:
    """Raise NotRegular unless ``path`` (followed if a link) is a regular file: for readers
    that open the file themselves (safetensors, TensorBoard, SQLite)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)


def _regular_fd(fd: int, path: Path) -> int:
    """``fd``, opened with ``O_NONBLOCK``, made blocking again once ``fstat`` shows a regular
    file; closed and NotRegular otherwise."""
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    os.set_blocking(fd, True)
    return fd


def open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for binary reading, or NotRegular: never blocks on a FIFO."""
    return os.fdopen(_regular_fd(os.open(path, os.O_RDONLY | os.O_NONBLOCK), path), "rb")


def read_file(path: Path) -> bytes:
    """The bytes of a regular file (NotRegular for anything else)."""
    with open_regular(path) as fh:
        return fh.read()


def read_file_text(path: Path) -> str:
    """A regular file's text; bytes that are not UTF-8 become U+FFFD, so a damaged file is
    judged by its content and never ends in UnicodeDecodeError."""
    return read_file(path).decode("utf-8", errors="replace")


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` whose failures are all ValueError: JSON nested deeper than the parser's
    recursion limit (a hostile or damaged file) included."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None


def count_values(data: Any, limit: int) -> int:
    """How many values ``data`` holds with every YAML alias expanded, counting up to ``limit``
    + 1 at most (PyYAML shares an alias's object, but printing or copying expands it: a
    "billion laughs" of a few lines holds 10^9)."""
    stack, count = [data], 0
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return count


def parse_yaml(text: str, max_values: int | None = None) -> Any:
    """``yaml.safe_load`` whose failures are all ``yaml.YAMLError``: YAML nested deeper than
    Python's recursion limit, or (with ``max_values``) expanding to more values than that."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise yaml.YAMLError("YAML nested too deep") from None
    if max_values is not None and count_values(data, max_values) > max_values:
        raise yaml.YAMLError(f"expands to more than {max_values} values (YAML aliases?)")
    return data


def read_json(path: Path) -> Any:
    """A regular file's JSON; ValueError when it is not JSON, NotRegular when not a file."""
    return parse_json(read_file(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, after checking it is a regular file (safetensors opens
    it itself, and would block on a FIFO)."""
    from safetensors.torch import load_file

    check_regular(path)
    return load_file(str(path))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def owner_of(path: Path) -> str | None:
    """The kind written in ``path``'s owner file, ``"legacy:<kind>"`` for an ldmkit directory
    from before owner files, ``""`` for an empty directory, None for anything else."""
    if path.is_symlink() or not path.is_dir():
        return None
    marker = path / OWNER_FILE
    if marker.is_file() and not marker.is_symlink():
        return marker.read_text(encoding="utf-8", errors="replace").strip()
    names = {p.name for p in path.iterdir()}
    if not names:
        return ""
    for kind, files in LEGACY_FILES.items():
        if names <= files and "meta.json" in names:
            return f"legacy:{kind}"
    return None


def check_replaceable(path: Path, kind: str) -> None:
    """Raise unless ``path`` is absent, empty, or an ldmkit directory of ``kind``."""
    if not path.exists() and not path.is_symlink():
        return
    owner = owner_of(path)
    if owner in ("", kind, f"legacy:{kind}"):
        return
    what = ("a symbolic link" if path.is_symlink() else "a file" if not path.is_dir()
            else f"an ldmkit {owner.removeprefix('legacy:').replace('_', ' ')}" if owner
            else "a directory ldmkit did not create")
    raise CheckpointError(f"'{path}' is {what}, not an ldmkit {kind.replace('_', ' ')}; ldmkit "
                          "never replaces it: choose a new path (or move it away yourself)")


def remove_owned(path: Path, kind: str) -> bool:
    """Delete ``path`` if it is an ldmkit directory of ``kind``; leave anything else alone."""
    owner = owner_of(path)
    if owner not in (kind, f"legacy:{kind}"):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def write_dir_atomically(final: Path, write: Callable[[Path], None], kind: str) -> None:
    """Call ``write(tmp_dir)``, fsync its files, then rename it to ``final``.

    ``final`` may only replace an ldmkit directory of the same ``kind`` (``check_replaceable``).
    The temporary and the displaced directories get names no other process uses, so nothing but
    what this call made is ever removed. On an I/O error (a full disk, a quota) the temporary
    directory is removed and what was saved before is left as it was.
    """
    check_replaceable(final, kind)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = old = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{final.name}.", dir=final.parent))
        os.chmod(tmp, DIR_MODE)
        write(tmp)
        (tmp / OWNER_FILE).write_text(kind + "\n", encoding="utf-8")
        for path in tmp.iterdir():
            _fsync(path)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old_{final.name}.", dir=final.parent))
            final.rename(old / final.name)
        tmp.rename(final)
        tmp = None
        _fsync(final.parent)
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise CheckpointError(f"could not write '{final}' ({reason}); everything saved before is "
                              "intact: free disk space or fix permissions, then resume") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise LinkRefused(f"'{path}' is a symbolic link; ldmkit never reads or writes a run's "
                          "files through a link: replace it with a regular file or remove it")


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Re-raise an OSError that names no file (a write to an open file on a full disk says only
    "No space left on device") as one naming ``path``, so the message names the culprit."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` through a fresh temporary file and ``os.replace``: a link at ``path`` is
    replaced, never written through, and a crash leaves the old file or the new one."""
    with naming(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


class AppendFile:
    """A log opened for appending whose write errors name it (``naming``)."""

    def __init__(self, fh: IO[str], path: Path):
        self.fh, self.path = fh, path

    def write(self, text: str) -> int:
        with naming(self.path):
            return self.fh.write(text)

    def flush(self) -> None:
        with naming(self.path):
            self.fh.flush()

    def close(self) -> None:
        with naming(self.path):
            self.fh.close()

    def __enter__(self) -> AppendFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_append(path: Path) -> AppendFile:
    """Open a log for appending; refuses a link instead of writing where it points, and
    anything but a regular file (a FIFO would block)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        _refuse_link(path)
        mode = os.stat(path).st_mode if os.path.exists(path) else stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode) from None
        raise exc
    return AppendFile(os.fdopen(_regular_fd(fd, path), "a", encoding="utf-8"), path)


def read_regular(path: Path) -> bytes:
    """The bytes of a regular file that is not a link (for what a report embeds)."""
    _refuse_link(path)
    return read_file(path)


def check_plain_tree(root: Path) -> None:
    """Refuse a run directory that holds, anywhere below it, a symbolic link (ldmkit writes and
    embeds files there, and must never reach outside the run through one) or a FIFO, socket
    or device (reading one would block or never end)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise LinkRefused(f"'{path}' is a symbolic link inside the run directory "
                                  f"'{root}'; ldmkit never follows links in a run: replace it "
                                  "with the file or directory itself, or remove it")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise NotRegular(f"'{path}' inside the run directory '{root}' is "
                                 f"{_kind(mode)}, not a regular file; remove it")


def check_output(path: Path, flag: str, directory: bool) -> None:
    """An output path given on the command line: its parent must be an existing directory, and
    ``path`` itself absent or of the right kind (a directory or a file)."""
    if path.is_symlink():
        raise LdmkitError(f"{flag} '{path}' is a symbolic link; give the real path")
    parent = path.parent
    if not parent.is_dir():
        raise LdmkitError(f"{flag} '{path}': the directory '{parent}' does not exist; create it "
                          "first")
    if not os.access(parent, os.W_OK):
        raise LdmkitError(f"{flag} '{path}': '{parent}' is not writable; choose another path")
    if path.exists() and path.is_dir() != directory:
        raise LdmkitError(f"{flag} '{path}' is {'a file' if directory else 'a directory'}; "
                          f"give {'a directory' if directory else 'a file path'}")
