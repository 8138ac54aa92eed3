"""bf16 autocast and ``torch.compile`` where they pay on this device (``train.precision`` and
``train.compile``: ``auto``), with the reason for each choice.

- **Precision.** bf16 autocast only where the device computes bf16 natively: a CUDA GPU with
  bf16 (compute capability 8.0 on), or a CPU with AVX-512 BF16 or AMX-BF16, read from the
  CPU's flags, not assumed. Elsewhere bf16 is emulated and slower, so ``auto`` keeps fp32. The
  weights, the optimizer, the loss and every vital sign stay fp32: autocast only lowers the
  precision of the network's matmuls and convolutions, and its outputs are cast back
  (``Parameterization.predict``), so no threshold of the guide moves.
- **Compilation.** ``torch.compile`` costs tens of seconds once per process (76 s for the demo
  UNet's training step on this project's 2-core CPU, cold cache) and saves a share of every
  call afterwards, so ``auto`` compiles a job only when it does enough work to win that back
  and where compiled training was measured to train as well (``AUTO_COMPILE``). Compiled
  training once trained a worse model: inductor (torch 2.13, CPU, bf16) gave every layer
  below an upsampling a zero gradient; ``models.layers.upsample_nearest_2x`` routes around it
  and MNIST runs compiled and eager now train alike (BENCHMARKS.md "Why compiled training
  trained worse"). A compilation that fails (no C++ compiler, an unsupported operation) falls
  back to eager with one line saying why, never a crash (``Compiled``).

The choice depends only on the device, its flags, the configuration and the job's size, never
on a timing, so a resumed run makes the same choice and resumes bitwise on the same machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ldmkit.platform.files import open_append, parse_json, read_file_text

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bf16 arithmetic
CXX_COMPILERS = ("g++", "c++", "clang++")  # what inductor's CPU backend can build with

# `compile: auto` per (device, job): the work from which compiling pays back its compile time,
# or None where auto never compiles, with why. train: optimizer steps; autoencoder: stage-1
# steps; sample: network evaluations x samples. Break-even points, BENCHMARKS.md "Precision
# and compilation" (demo models on this project's 2-core CPU, cold inductor cache): train 76 s
# to compile, 33 ms saved per step (bf16 eager -> bf16 compiled): 2300 steps; autoencoder 37 s,
# 29 ms: 1300; sampling 35 s, 66 us per sample and evaluation: 500 000, rounded up. Training
# compiles where it pays since MNIST runs compiled and eager trained alike, two seeds each
# (BENCHMARKS.md "Quality on the fast path"); stage 1 is not measured so yet.
AUTO_COMPILE: dict[tuple[str, str], tuple[int | None, str]] = {
    ("cpu", "train"): (2300, "where it pays; trains as well, BENCHMARKS.md"),
    ("cpu", "autoencoder"): (None, "compiled stage 1 is not yet measured to train as well"),
    ("cpu", "sample"): (500_000, "where it pays"),
    ("cuda", "train"): (None, "not measured on a GPU here; set train.compile: true to compile"),
    ("cuda", "autoencoder"): (None, "not measured on a GPU here"),
    ("cuda", "sample"): (500_000, "where it pays (the CPU's break-even; no GPU measured)"),
}
UNIT = {"train": "training steps", "autoencoder": "autoencoder steps",
        "sample": "network evaluations x samples", "encode": "images"}

T = TypeVar("T")


@dataclass(frozen=True)
class FastPath:
    """How one job computes: bf16 autocast or fp32, compiled or eager, and why."""

    device_type: str = "cpu"
    bf16: bool = False
    compile: bool = False
    precision_reason: str = "fp32 (train.precision: fp32)"
    compile_reason: str = "eager (train.compile: false)"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast of what runs inside, or nothing."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, torch.bfloat16)

    def describe(self) -> str:
        return f"{self.precision_reason}; {self.compile_reason}"

    def fell_back(self, cause: str) -> FastPath:
        """This path once compiling failed: what actually ran from then on."""
        return dataclasses.replace(self, compile=False,
                                   compile_reason=f"eager (torch.compile failed: {cause})")

    def as_dict(self) -> dict[str, Any]:
        return {"precision": "bf16" if self.bf16 else "fp32", "compile": self.compile,
                "precision_reason": self.precision_reason,
                "compile_reason": self.compile_reason}


EAGER_FP32 = FastPath()


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags: Linux's ``/proc/cpuinfo``, else what torch's own CPU probe says
    of the bf16 ones (macOS, Windows)."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    return frozenset(flag for flag, probe in probes.items()
                     if getattr(torch.cpu, probe, lambda: False)())


def native_bf16(device: torch.device, flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and the evidence in words."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} (compute capability {major}.{minor}) has native bf16"
        return False, f"{name} (compute capability {major}.{minor}) lacks native bf16"
    if device.type == "cpu":
        found = [f for f in CPU_BF16_FLAGS if f in (cpu_flags() if flags is None else flags)]
        if found:
            return True, f"the CPU has {' and '.join(found)}"
        return False, f"the CPU has neither {' nor '.join(CPU_BF16_FLAGS)} (bf16 emulated, slower)"
    return False, f"bf16 speed on {device.type} is not measured"


def compiler_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot build code for ``device`` here, or None."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install triton)"
        return None
    if device.type != "cpu":
        return f"torch.compile is not used on {device.type}"
    chosen = os.environ.get("CXX")
    if chosen and shutil.which(chosen):
        return None
    if not chosen and any(shutil.which(c) for c in CXX_COMPILERS):
        return None
    wanted = f"CXX={chosen} is not found" if chosen else "no C++ compiler (g++, clang++) found"
    return f"{wanted}; install one (apt install g++) to compile"


def choose(precision: str, compile: bool | str, device: torch.device, job: str, work: int,
           flags: frozenset[str] | None = None) -> FastPath:
    """The fast path of ``job`` (``train``, ``autoencoder``, ``sample``) doing ``work`` units
    (``UNIT``) on ``device`` under the config's ``precision`` and ``compile``."""
    if precision == "auto":
        bf16, evidence = native_bf16(device, flags)
        why = f"{'bf16 autocast' if bf16 else 'fp32'} (precision auto: {evidence})"
    else:
        bf16, why = precision == "bf16", f"{precision} (train.precision: {precision})"
    if bf16 and device.type == "cpu" and precision == "bf16" and not native_bf16(device, flags)[0]:
        why += "; this CPU emulates bf16, so it is slower than fp32"
    problem = compiler_problem(device) if compile is not False else None
    if compile is False:
        compiled, how = False, "eager (train.compile: false)"
    elif problem:
        compiled, how = False, f"eager ({problem})"
    elif compile is True:
        compiled, how = True, "compiled (train.compile: true)"
    else:
        least, reason = AUTO_COMPILE.get((device.type, job), (None, "never for this job"))
        compiled = least is not None and work >= least
        if least is None:
            how = f"eager (compile auto: {reason})"
        elif compiled:
            how = f"compiled (compile auto: {work} {UNIT[job]} >= {least}, {reason})"
        else:
            how = (f"eager (compile auto: {work} {UNIT[job]} < {least}, too few to pay for "
                   "compiling)")
    return FastPath(device.type, bf16, compiled, why, how)


COMPILER_PACKAGES = ("torch._dynamo", "torch._inductor", "torch._functorch")
_COMPILER_DIRS = tuple(os.path.join("torch", p.split(".")[1]) + os.sep for p in COMPILER_PACKAGES)


def is_compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) was raised by dynamo, AOTAutograd or inductor, or
    passed through them: a backward compiled lazily raises its compiler's own error there."""
    seen: BaseException | None = exc
    while seen is not None:
        if type(seen).__module__.startswith(COMPILER_PACKAGES):
            return True
        if any(d in frame.f_code.co_filename
               for frame, _ in traceback.walk_tb(seen.__traceback__) for d in _COMPILER_DIRS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def root_cause(exc: BaseException) -> str:
    """The innermost cause of ``exc`` in one line: dynamo wraps the backend's error in
    ``BackendCompilerFailed`` and appends paragraphs of advice."""
    while (inner := exc.__cause__ or getattr(exc, "inner_exception", None)) is not None:
        exc = inner
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


_FAILED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


class Compiled:
    """``module``'s compiled forward, or its eager one once compiling failed.

    Compilation is lazy: the forward compiles at its first call and the backward at its first
    backward, so a failure can surface in either. ``run`` retries a whole step eagerly after a
    compile error; ``__call__`` does the same for a forward alone (sampling). Either way one
    line says why and the module stays eager from then on. The module's own state dict is
    what checkpoints save, so no ``_orig_mod.`` prefix reaches a file.
    """

    def __init__(self, module: nn.Module, fast: FastPath, echo: Callable[[str], None] = print,
                 what: str = "the backbone",
                 on_fall_back: Callable[[FastPath], None] | None = None):
        self.module, self.what, self.echo = module, what, echo
        self.fast, self.on_fall_back = fast, on_fall_back  # told what runs after a fall-back
        tried = fast.compile and module not in _FAILED  # said once per module and process
        self.compiled = torch.compile(module) if tried else None

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def fall_back(self, exc: BaseException) -> None:
        cause = root_cause(exc)
        self.echo(f"[ldmkit] torch.compile failed for {self.what} ({cause}); continuing "
                  "eager. Set train.compile: false to skip trying")
        self.compiled = None
        _FAILED[self.module] = cause
        self.fast = self.fast.fell_back(cause)
        if self.on_fall_back is not None:
            self.on_fall_back(self.fast)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:
                if not is_compile_error(exc):
                    raise
                self.fall_back(exc)
        return self.module(*args, **kwargs)

    def run(self, step: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``step(*args)``, again eagerly if compiling failed inside it (its backward)."""
        if self.compiled is None:
            return step(*args, **kwargs)
        try:
            return step(*args, **kwargs)
        except Exception as exc:
            if not is_compile_error(exc):
                raise
            self.fall_back(exc)
            return step(*args, **kwargs)


FASTPATH_FILE = "fastpath.jsonl"  # RunDir.fastpath: a run's choices, one record per job and start


def record(path: Path, job: str, step: int, fast: FastPath,
           echo: Callable[[str], None] = print) -> None:
    """Print the choice and its reasons, and append them to ``path`` (``RUN/fastpath.jsonl``:
    one record per job and start, so a resumed run on another machine shows both)."""
    echo(f"fast path ({job}): {fast.describe()}")
    with open_append(path) as fh:
        fh.write(json.dumps({"job": job, "at_step": step, **fast.as_dict(),
                             "torch": torch.__version__}) + "\n")


def recorded(path: Path, job: str = "train") -> str | None:
    """The last recorded choice of ``job`` in ``path`` (``RUN/fastpath.jsonl``) in words, or
    None (a run made before it, or an unreadable record)."""
    try:
        lines = read_file_text(path).splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = parse_json(line)
            if rec.get("job") == job:
                return f"{rec['precision_reason']}; {rec['compile_reason']}"
        except (ValueError, AttributeError, KeyError):
            continue
    return None
