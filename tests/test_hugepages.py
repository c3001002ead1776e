"""The CLI's allocator setting: when it re-executes with glibc's huge-page tunable, and that the memory a
re-executed process maps is then backed by huge pages."""

import os
import platform
import subprocess
import sys

import pytest

from reft_jax import hugepages as H

GLIBC = ("glibc", "2.36")


def test_the_tunable_is_added_only_where_it_can_work_and_the_user_left_it_open():
  assert H.tunables_with_huge_pages({}, GLIBC, "madvise") == H.TUNABLE
  assert H.tunables_with_huge_pages({}, GLIBC, "always") == H.TUNABLE
  kept = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  assert H.tunables_with_huge_pages(kept, GLIBC, "madvise") == "glibc.malloc.arena_max=2:" + H.TUNABLE
  assert H.tunables_with_huge_pages({}, GLIBC, "never") is None  # the kernel grants none
  assert H.tunables_with_huge_pages({}, ("glibc", "2.34"), "madvise") is None  # no such tunable yet
  assert H.tunables_with_huge_pages({}, ("", ""), "madvise") is None  # musl, macOS
  assert H.tunables_with_huge_pages({"REFT_JAX_HUGE_PAGES": "0"}, GLIBC, "madvise") is None
  assert H.tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise") is None


def test_only_a_process_started_as_the_cli_reexecutes():
  py = "/usr/bin/python3"
  assert H.cli_command([py, "/venv/bin/reft-jax", "--config=c.py"]) == ["/venv/bin/reft-jax", "--config=c.py"]
  assert H.cli_command([py, "-X", "utf8", "-m", "reft_jax", "eval"]) == ["-X", "utf8", "-m", "reft_jax", "eval"]
  assert H.cli_command([py, "my_sweep.py", "--x"]) is None  # someone's program calling reft_jax.main.run
  assert H.cli_command([py, "-m", "pytest", "tests"]) is None
  assert H.cli_command([py, "-c", "import reft_jax"]) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  f = tmp_path / "enabled"
  f.write_text("always [madvise] never\n")
  assert H.thp_mode(str(f)) == "madvise"
  assert H.thp_mode(str(tmp_path / "missing")) == ""


CHILD = """
import os, sys
from reft_jax import hugepages
hugepages.reexec_with_huge_pages(sys.orig_argv[1:])
import numpy as np
x = np.ones(256 * 2**20 // 8)  # 256 MiB: glibc maps it
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")]
print(os.environ.get("GLIBC_TUNABLES"), int(huge[0].split()[1]) if huge else -1, float(x.sum()))
"""


def _child(**env):
  r = subprocess.run(
    [sys.executable, "-c", CHILD], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
  )
  assert r.returncode == 0, r.stderr[-2000:]
  tunables, huge_kb, _ = r.stdout.split()  # the sum only makes numpy touch every page
  return tunables, int(huge_kb)


@pytest.mark.skipif(
  H.tunables_with_huge_pages({}, platform.libc_ver(), H.thp_mode()) is None, reason="no glibc >= 2.35 or no THP"
)
def test_a_reexecuted_process_maps_its_large_buffers_on_huge_pages(monkeypatch):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  tunables, huge_kb = _child()
  assert tunables == H.TUNABLE  # the command line ran again, now with the tunable
  assert huge_kb >= 128 * 1024  # most of the 256 MiB buffer
  off, off_kb = _child(REFT_JAX_HUGE_PAGES="0")
  assert off == "None"
  if H.thp_mode() == "madvise":  # huge pages only where asked for: without the tunable, none for numpy
    assert off_kb < huge_kb
