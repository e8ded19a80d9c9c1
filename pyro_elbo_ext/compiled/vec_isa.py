"""Inductor's vector-ISA probe, answered once per machine and kept where this package finds it.

Before its first CPU kernel in a process, Inductor (``torch._inductor.cpu_vec_isa``) checks
each vector instruction set the CPU reports (AVX-512 with VNNI and BF16, AVX-512, AVX2 on x86)
by compiling small test programs (``VecISA.check_build``; the main one against ATen's vector
headers) and loading each in a child process: about 9 s on a 2-core machine whose Inductor
cache is empty (the compiled test programs live in that cache, so a new cache probes again).
Each answer depends only on the test program, the compiler flags, the CPU, the compiler and
torch, so this module keeps the answers in :data:`CACHE_FILE`
(``~/.cache/pyro_elbo_ext/vec_isa.json``), keyed by the CPU's instruction sets, the compiler's
path and version string, the platform and torch's version, and by a hash of the program and
its flags.

While a compiled step or loop is built (:func:`probe_cached`), ``VecISA.check_build`` answers
from the record where it holds a passed check for this key and program, and otherwise runs the
check as usual and records it if it passed.  A failed check is never recorded (it may have
failed for a passing reason, such as a timeout on a busy machine), so it is tried again in the
next process.  Inductor picks its instruction set from these answers exactly as it would have.

Delete the file to probe again; a ``TORCHINDUCTOR_VEC_ISA_OK`` set by the user (Inductor's own
override) wins; ``PYRO_ELBO_EXT_VEC_ISA_CACHE=0`` turns the record off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

#: the record of passed checks, one entry per (CPU, compiler, platform, torch) key
CACHE_FILE = Path("~/.cache/pyro_elbo_ext/vec_isa.json").expanduser()
#: set to ``0`` to neither read nor write :data:`CACHE_FILE`
ENVIRONMENT_SWITCH = "PYRO_ELBO_EXT_VEC_ISA_CACHE"


def _enabled() -> bool:
    return os.environ.get(ENVIRONMENT_SWITCH, "1") != "0"


@functools.cache
def _key() -> str:
    """The CPU's instruction sets, the compiler, the platform and torch: what the answers
    depend on besides the test program."""
    from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler
    from torch._inductor.cpu_vec_isa import x86_isa_checker

    compiler = get_cpp_compiler()
    return json.dumps([sorted(x86_isa_checker()), platform.machine(), compiler,
                       get_compiler_version_info(compiler), platform.platform(),
                       torch.__version__])


def _check_name(flags: str, code: str) -> str:
    return hashlib.sha256(f"{flags}\0{code}".encode()).hexdigest()[:32]


def _read() -> dict:
    try:
        records = json.loads(CACHE_FILE.read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def _write(records: dict) -> None:
    try:
        CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        temporary = CACHE_FILE.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(records, indent=1, sort_keys=True))
        temporary.replace(CACHE_FILE)
    except OSError:  # a read-only home: the probe simply runs again next time
        pass


def recorded_checks() -> set[str]:
    """The names of the checks recorded as passed for this machine's key."""
    entry = _read().get(_key(), [])
    return set(entry) if isinstance(entry, list) else set()


@contextmanager
def probe_cached() -> Iterator[None]:
    """While Inductor compiles: its ISA checks answered from the record where it has them,
    run and recorded otherwise (see the module docstring)."""
    from torch._inductor import config

    if not _enabled() or config.cpp.vec_isa_ok is not None:
        yield
        return
    try:
        from torch._inductor.cpu_vec_isa import VecISA

        original = VecISA.__dict__["check_build"]
        known = recorded_checks()
    except Exception:  # another torch's internals: leave the probe to Inductor
        yield
        return
    passed: set[str] = set()

    def check_build(isa, code: str) -> bool:
        name = _check_name(isa.build_arch_flags(), code)
        if name in known:
            return True
        result = original(isa, code)
        if result:
            passed.add(name)
        return result

    VecISA.check_build = check_build
    try:
        yield
    finally:
        VecISA.check_build = original
        if passed - known:
            records = _read()
            records[_key()] = sorted(set(records.get(_key(), [])) | known | passed)
            _write(records)


__all__ = ["CACHE_FILE", "ENVIRONMENT_SWITCH", "probe_cached", "recorded_checks"]
