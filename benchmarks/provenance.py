"""Where a measurement came from: the commit and the machine, for every results file."""

from __future__ import annotations

import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
  """The checkout's short commit, with "+changes" when tracked files differ from it."""
  run = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout
  head = run("rev-parse", "--short", "HEAD").strip() or "unknown"
  return head + ("+changes" if run("status", "--porcelain", "--untracked-files=no").strip() else "")


def machine() -> str:
  """The CPU's model name and core count (a results file compares runs on one machine only)."""
  name = platform.processor()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
  return f"{name}, {os.cpu_count()} cores"
