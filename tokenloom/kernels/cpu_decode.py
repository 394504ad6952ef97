"""Fused small ops of a CPU decode step, and GGUF blocks unpacked in one pass at load (L1t), from
`cpu_decode.c`.

The C source ships with the package and is compiled once per machine with the C compiler found on
the path (`$CC`, else `cc`, `gcc` or `clang`; about a second), into
`$TOKENLOOM_HOME/kernels/` (default `~/.cache/tokenloom/kernels/`), keyed by the source, the
compiler and the CPU. ctypes calls it, releasing the GIL for each call. Without a compiler, or
with `TOKENLOOM_FUSED_DECODE=0`, `ops()` returns None and the model runs its torch ops instead.

Every function takes raw pointers of contiguous CPU tensors; `CpuDecodeOps` checks nothing per
call, so its callers (models/fused_decode.py) check shapes, dtypes and contiguity once per plan.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

from tokenloom.home import tokenloom_home

logger = logging.getLogger(__name__)

ENV_SWITCH = "TOKENLOOM_FUSED_DECODE"
ABI_VERSION = 2
FLOAT32, BFLOAT16 = 0, 1  # the C code's dtype codes
MAX_HEAD_DIM = 1024  # the C code's stack buffer for one head

_LOCK = threading.Lock()
_OPS: CpuDecodeOps | None = None
_TRIED = False

_P, _I, _F, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64
_SIGNATURES = {
    "tl_add_rmsnorm": (None, [_P, _P, _I, _P, _F, _I, _I, _P, _I]),
    "tl_rope_write": (None, [_P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P]),
    "tl_attend": (_I, [_P, _P, _P, _P, _I64, _P, _I, _I, _I, _I, _I, _F, _P, _I]),
    "tl_silu_mul": (None, [_P, _I, _I, _I, _P, _I]),
    "tl_dequant_q8_0": (None, [_P, _I64, _P]),
    "tl_dequant_q4": (None, [_P, _I64, _I, _P]),
    "tl_pack_q4": (_I, [_P, _I, _I, _I, _P, _P]),
    "tl_abi_version": (_I, []),
}


class CpuDecodeOps:
    """The compiled library's functions (see cpu_decode.c for what each computes)."""

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        for name, (restype, argtypes) in _SIGNATURES.items():
            function = getattr(library, name)
            function.restype, function.argtypes = restype, argtypes
        if library.tl_abi_version() != ABI_VERSION:
            raise OSError(f"{path} is not version {ABI_VERSION} of the fused decode ops")
        self.add_rmsnorm = library.tl_add_rmsnorm
        self.rope_write = library.tl_rope_write
        self.attend = library.tl_attend
        self.silu_mul = library.tl_silu_mul
        self.dequant_q8_0 = library.tl_dequant_q8_0
        self.dequant_q4 = library.tl_dequant_q4
        self.pack_q4 = library.tl_pack_q4
        self._library = library  # keeps the handle open


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_key() -> str:
    """What the compiled code depends on besides the source: the CPU model and its flags."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _compile(source: bytes, compiler: str, target: Path) -> None:
    """Compile to a temporary file beside `target` and move it into place (concurrent builders each
    produce a whole file; the last rename wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        src = Path(work) / "cpu_decode.c"
        src.write_bytes(source)
        out = Path(work) / target.name
        base = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd", "-shared", "-fPIC", "-o", str(out), str(src), "-lm"]
        errors = []
        for arch in (["-march=native"], []):  # a compiler that does not know this CPU: generic code
            done = subprocess.run([compiler, *arch, *base], capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(out, target)
                return
            errors.append(done.stderr.strip()[-400:])
        raise OSError(f"{compiler} could not build the fused decode ops: {errors[-1]}")


def _build() -> CpuDecodeOps | None:
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        logger.debug("%s=0: the decode step uses torch ops", ENV_SWITCH)
        return None
    source = resources.files("tokenloom.kernels").joinpath("cpu_decode.c").read_bytes()
    compiler = _compiler()
    if compiler is None:
        logger.info("no C compiler on the PATH: the decode step uses torch ops (set CC to enable the fused ops)")
        return None
    key = hashlib.sha256(source + compiler.encode() + _cpu_key().encode()).hexdigest()[:16]
    target = tokenloom_home() / "kernels" / f"cpu_decode-{key}.so"
    try:
        if not target.exists():
            _compile(source, compiler, target)
        return CpuDecodeOps(ctypes.CDLL(str(target)), target)
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("the fused decode ops are unavailable, the decode step uses torch ops: %s", error)
        return None


def ops() -> CpuDecodeOps | None:
    """The fused ops, built on first use (once per process), or None where they cannot be built."""
    global _OPS, _TRIED
    if not _TRIED:
        with _LOCK:
            if not _TRIED:
                _OPS = _build()
                _TRIED = True
    return _OPS
