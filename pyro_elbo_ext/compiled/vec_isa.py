"""Inductor's vector-ISA probe, answered once per machine and kept where this package finds it.

Before its first CPU kernel in a process, Inductor (``torch._inductor.cpu_vec_isa``) checks
each vector instruction set the CPU reports (AVX-512 with VNNI, AVX-512, AVX2 on x86) by
compiling a test program against ATen's vector headers and loading it in a child Python: about
9 s on a 2-core machine whose Inductor cache is empty (the compiled test programs live in
that cache).  The answer depends only on the CPU, the C++ compiler and torch, so this module
keeps it in :data:`CACHE_FILE` (``~/.cache/pyro_elbo_ext/vec_isa.json``), keyed by the CPU's
instruction sets, the compiler's version string, the platform and torch's version:

* when a compile finds a record for this key in which every instruction set the CPU reports
  passed the probe, Inductor is told so (``torch._inductor.config.cpp.vec_isa_ok = True``,
  the setting ``TORCHINDUCTOR_VEC_ISA_OK=1`` makes), which skips the test programs and picks
  exactly the instruction set the probe would have picked;
* otherwise the probe runs as usual, and its result is recorded after the compile.

A record in which some instruction set failed is never used to skip the probe (``vec_isa_ok``
cannot say "only these").  Delete the file to probe again; a ``TORCHINDUCTOR_VEC_ISA_OK`` set
by the user wins; ``PYRO_ELBO_EXT_VEC_ISA_CACHE=0`` turns the record off.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

#: the record of the probe's answers, one entry per (CPU, compiler, torch) key
CACHE_FILE = Path("~/.cache/pyro_elbo_ext/vec_isa.json").expanduser()
#: set to ``0`` to neither read nor write :data:`CACHE_FILE`
ENVIRONMENT_SWITCH = "PYRO_ELBO_EXT_VEC_ISA_CACHE"


def _enabled() -> bool:
    return os.environ.get(ENVIRONMENT_SWITCH, "1") != "0" and platform.machine() in (
        "x86_64", "AMD64")


@functools.cache
def _key() -> str:
    """The CPU's instruction sets, the compiler, the platform and torch: what the probe's
    answer depends on."""
    from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler
    from torch._inductor.cpu_vec_isa import x86_isa_checker

    compiler = get_cpp_compiler()
    return json.dumps([sorted(x86_isa_checker()), compiler,
                       get_compiler_version_info(compiler), platform.platform(),
                       torch.__version__])


def _candidates() -> list[str]:
    """The instruction sets the CPU reports that Inductor would probe."""
    from torch._inductor.cpu_vec_isa import supported_vec_isa_list, x86_isa_checker

    reported = x86_isa_checker()
    return [str(isa) for isa in supported_vec_isa_list
            if all(flag in reported for flag in str(isa).split())]


def _read() -> dict:
    try:
        return json.loads(CACHE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _record() -> None:
    """Write the probe's answer (Inductor has probed in this process) for this key."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    passed = sorted(str(isa) for isa in valid_vec_isa_list())
    records = _read()
    entry = {"candidates": sorted(_candidates()), "passed": passed}
    if records.get(_key()) == entry:
        return
    records[_key()] = entry
    try:
        CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        temporary = CACHE_FILE.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(records, indent=1))
        temporary.replace(CACHE_FILE)
    except OSError:  # a read-only home: the probe simply runs again next time
        pass


def known_good() -> bool:
    """Whether the record says every instruction set the CPU reports passed the probe."""
    entry = _read().get(_key())
    return bool(entry) and entry.get("passed") == entry.get("candidates") == sorted(
        _candidates())


@contextmanager
def probe_cached() -> Iterator[None]:
    """While Inductor compiles: skip the probe where the record answers it; else record the
    probe's answer afterwards (see the module docstring)."""
    from torch._inductor import config

    if not _enabled() or config.cpp.vec_isa_ok is not None:
        yield
        return
    try:
        good = known_good()
    except Exception:  # another torch's internals: leave the probe to Inductor
        yield
        return
    if good:
        with config.patch({"cpp.vec_isa_ok": True}):
            yield
        return
    yield
    try:
        _record()
    except Exception:
        pass


__all__ = ["CACHE_FILE", "ENVIRONMENT_SWITCH", "known_good", "probe_cached"]
