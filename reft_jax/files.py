"""Files in the workdir, written so that a crash, a full disk or a second run never leaves a torn or half-written
one: whole-line appends, atomic replaces, a writability probe before anything runs, and one run per workdir
(a lock). `describe` turns an OSError into the one line the CLI prints."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time

# What to do about the errors a user can fix, by errno.
_ADVICE = {
  errno.ENOSPC: "the disk is full; free space and rerun (finished stages and checkpoints are kept)",
  errno.EDQUOT: "the disk quota is used up; free space and rerun (finished stages and checkpoints are kept)",
  errno.EROFS: "the file system is read-only; choose another --workdir",
  errno.EACCES: "permission denied; choose another --workdir or fix its permissions",
  errno.EPERM: "permission denied; choose another --workdir or fix its permissions",
}


class WorkdirBusy(RuntimeError):
  """Another run holds the workdir's lock."""


def describe(e: OSError) -> str:
  """One line for an OSError: the path, what happened and what to do."""
  where = f"{e.filename}: " if e.filename else ""
  what = e.strerror or str(e)
  advice = _ADVICE.get(e.errno)
  return f"{where}{what}" + (f" ({advice})" if advice else "")


def check_workdir(workdir: str) -> None:
  """Creates workdir and writes (then removes) a small probe file, so a workdir that is a file, read-only or
  on a full disk fails here, before any state is touched; raises OSError naming the path."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(errno.ENOTDIR, "--workdir is a file, not a directory; choose another", workdir)
  probe = os.path.join(workdir, f".write_probe.{os.getpid()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "wb") as f:
      f.write(b"\0" * 65536)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    raise OSError(e.errno, f"--workdir cannot be written: {e.strerror}", workdir) from None
  finally:
    with contextlib.suppress(OSError):
      os.remove(probe)


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds workdir/.lock for the run: a second run on the same workdir fails at once instead of interleaving
  checkpoints and metrics. The kernel drops the lock when the process dies, so it never goes stale."""
  fd = os.open(os.path.join(workdir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
      raise WorkdirBusy(
        f"{workdir}: another run is using this workdir ({holder}); wait for it to finish or choose another --workdir"
      ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    yield
  finally:
    os.close(fd)


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to path through a temporary file and a rename: readers see the old file or the new one,
  never a part (a crash or a full disk leaves the old one in place)."""
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def append_line(fd: int, line: str) -> None:
  """Appends `line` (ending in a newline) to the file open as `fd` (O_APPEND); on any write error the file
  is cut back to its length before, so no reader ever meets half a line."""
  data = memoryview(line.encode("utf-8"))
  start = os.lseek(fd, 0, os.SEEK_END)
  try:
    while data:
      data = data[os.write(fd, data) :]
  except OSError:
    with contextlib.suppress(OSError):  # the original error is the one to report
      os.ftruncate(fd, start)
    raise


def repair_tail(path: str) -> int:
  """Cuts a torn last line (no final newline) off `path`; returns the bytes cut (0: nothing to repair)."""
  if not os.path.isfile(path):  # absent, or not a regular file (a device, a pipe): nothing to cut
    return 0
  with open(path, "rb+") as f:
    size = end = f.seek(0, os.SEEK_END)
    while end > 0:  # back to the last newline, a block at a time
      start = max(0, end - 65536)
      f.seek(start)
      block = f.read(end - start)
      if end == size and block.endswith(b"\n"):
        return 0
      i = block.rfind(b"\n")
      if i >= 0:
        end = start + i + 1
        break
      end = start
    f.truncate(end)
  return size - end
