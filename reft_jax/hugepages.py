"""Transparent huge pages for the CLI's allocations (glibc's `glibc.malloc.hugetlb=1` tunable).

XLA:CPU allocates a step's temporary buffers afresh on every call (SmolLM2's LoRA step: 1.7 GB,
428,000 page faults per step on 4 KiB pages). With the tunable, glibc asks the kernel for huge pages
(madvise) on the memory it maps: 1,230 faults per step, and the step 2-15% faster in five paired runs
on the 2-core AMD EPYC machine of 2026-12-03 (README, "Speed"). A tunable is read when the process
starts, so the CLI re-executes itself once with it set, before JAX is imported. REFT_JAX_HUGE_PAGES=0
turns this off.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE) -> str:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), '' where there is none."""
  try:
    with open(path) as f:
      return next((w[1:-1] for w in f.read().split() if w.startswith("[")), "")
  except OSError:
    return ""


def tunables_with_huge_pages(environ, libc: tuple[str, str], mode: str) -> str | None:
  """GLIBC_TUNABLES to re-execute with, or None to leave the process as it is: glibc >= 2.35 (the
  tunable's first release), a kernel that grants huge pages on request, no hugetlb setting of the user's
  own, and REFT_JAX_HUGE_PAGES not 0."""
  name, version = libc
  if environ.get("REFT_JAX_HUGE_PAGES", "1") == "0" or name != "glibc" or mode not in ("always", "madvise"):
    return None
  try:
    if tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
      return None
  except ValueError:
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in current:
    return None
  return f"{current}:{TUNABLE}" if current else TUNABLE


def cli_command(orig_argv: list[str]) -> list[str] | None:
  """The interpreter's arguments that started the CLI (`reft-jax ...`, `python -m reft_jax ...`, with any
  interpreter options), or None where reft_jax.main.run was called from someone else's program, which a
  re-execution would run again from its start."""
  args, i = orig_argv[1:], 0
  while i < len(args):
    a = args[i]
    if a == "-m":
      return args if args[i + 1 : i + 2] == ["reft_jax"] else None
    if a == "-c":
      return None
    if not a.startswith("-"):  # the script: the console script `reft-jax`
      return args if os.path.basename(a).startswith("reft-jax") else None
    i += 2 if a in ("-X", "-W") else 1  # the options that take a value
  return None


def reexec_with_huge_pages(args: list[str] | None) -> None:
  """Replaces this process by `python *args` with the tunable set; returns where args is None or
  tunables_with_huge_pages says no."""
  tunables = tunables_with_huge_pages(os.environ, platform.libc_ver(), thp_mode())
  if tunables is None or args is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *args], {**os.environ, "GLIBC_TUNABLES": tunables})
