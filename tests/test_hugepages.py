"""train.py / eval.py start again with glibc's huge-page malloc when it changes something."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

from m2sa_jax import hugepages as hp


def test_environment_only_where_it_changes_something():
    glibc = ("glibc", "2.36")
    env = hp.hugepage_environment({"PATH": "/bin"}, "madvise", glibc)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    both = hp.hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise",
                                   glibc)
    assert both["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hp.hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise",
                                   glibc) is None              # the user's own choice stays
    assert hp.hugepage_environment({}, "always", glibc) is None     # huge pages anyway
    assert hp.hugepage_environment({}, "never", glibc) is None      # none to have
    assert hp.hugepage_environment({}, None, glibc) is None
    assert hp.hugepage_environment({}, "madvise", ("glibc", "2.31")) is None   # no tunable
    assert hp.hugepage_environment({}, "madvise", ("", "")) is None            # musl, macOS
    assert hp.hugepage_environment({hp.OPT_OUT: "0"}, "madvise", glibc) is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hp.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert hp.thp_mode(str(f)) == "always"
    assert hp.thp_mode(str(tmp_path / "missing")) is None


def test_program_starts_again_once_with_the_tunable():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hp.OPT_OUT)}
    code = ("import os, sys; from m2sa_jax.hugepages import reexec_with_hugepage_malloc as r; "
            "print('start', sys.argv[1:], flush=True); r(); "
            "print('tunables', os.environ.get('GLIBC_TUNABLES'))")
    out = subprocess.run([sys.executable, "-c", code, "--flag", "x y"], env=env, text=True,
                         capture_output=True, check=True, timeout=120).stdout.splitlines()
    expected = hp.hugepage_environment(env, hp.thp_mode(), platform.libc_ver())
    if sys.platform == "linux" and expected is not None:
        assert out == ["start ['--flag', 'x y']"] * 2 + ["tunables glibc.malloc.hugetlb=1"]
    else:
        assert out == ["start ['--flag', 'x y']", "tunables None"]
    env[hp.OPT_OUT] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True,
                         check=True, timeout=120).stdout.splitlines()
    assert out == ["start []", "tunables None"]
