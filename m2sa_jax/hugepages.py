"""Transparent huge pages for the memory a CPU run allocates.

XLA:CPU allocates every program's buffers with ``malloc``; a train step of the demo allocates and
frees hundreds of megabytes, which glibc maps and unmaps with 4 KiB pages, so the kernel zeroes
and faults in every page again at each step (a quarter of the process's CPU time went to the
kernel). Where the kernel gives huge pages only on request (``transparent_hugepage`` set to
``madvise``, Debian's and Ubuntu's default), glibc ≥ 2.35 asks for them when the environment says
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``; the demo's train step then ran 1.47× faster (3.84 →
5.66 steps/s, docs/performance.md). The numbers computed are the same.

glibc reads the variable when a process starts, so ``train.py`` and ``eval.py`` start themselves
again with it (:func:`reexec_with_hugepage_malloc`) when it would change something.
``M2SA_HUGEPAGE_MALLOC=0`` turns this off.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "M2SA_HUGEPAGE_MALLOC"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def hugepage_environment(environ: Mapping[str, str], thp: str | None,
                         libc: tuple[str, str]) -> dict[str, str] | None:
    """The environment to start again with, or None when it would change nothing: opted out,
    huge pages not given on request (``always`` gives them anyway, ``never`` not at all), not
    glibc ≥ 2.35, or the tunable already set."""
    if environ.get(OPT_OUT, "1").strip() == "0" or thp != "madvise":
        return None
    name, version = libc
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or major_minor < (2, 35):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    return env


def reexec_with_hugepage_malloc() -> None:
    """Start this program again, same interpreter and arguments, with glibc's huge-page malloc
    when :func:`hugepage_environment` says it would change something; otherwise return."""
    if sys.platform != "linux":
        return
    env = hugepage_environment(os.environ, thp_mode(), platform.libc_ver())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:                                 # cannot start again: run as we are
        return
