"""CPU time and resident memory of a proxy and the processes it forked, from /proc: the peers
bench charges nginx's and LiteLLM's workers to them as it charges the router's to the router."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it (a scan of /proc by parent pid)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live descendants."""
    ticks = 0
    for each in descendants(pid):
        try:
            fields = _stat_fields(each)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_rss_mb(pid: int) -> float:
    """VmRSS of `pid` and its live descendants, in MiB (shared pages counted once per process:
    an upper bound for forked workers)."""
    kib = 0
    for each in descendants(pid):
        try:
            status = (PROC / str(each) / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                kib += int(line.split()[1])
                break
    return kib / 1024
