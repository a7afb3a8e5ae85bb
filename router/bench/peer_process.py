"""A proxy the peers bench started: its process, port and log, and the wait for its first 200."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from router.bench.harness import post


@dataclass(frozen=True)
class Started:
    proc: subprocess.Popen[bytes]
    port: int
    version: str
    log: Path


def wait_ready(proc: subprocess.Popen[bytes], port: int, logs: Sequence[Path],
               timeout: float) -> None:
    """Until a non-streamed chat completion through `port` answers 200; RuntimeError with the
    logs' tails when the process exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status, body = post(port, "bench-fast", timeout=5)
        except OSError as exc:
            last = str(exc)
            time.sleep(0.2)
            continue
        if status == 200:
            return
        last = f"HTTP {status}: {body[:300]!r}"
        time.sleep(0.3)
    tails = "\n".join(f"{log}:\n{log.read_text(errors='replace')[-1500:]}"
                      for log in logs if log.exists())
    exited = "" if proc.poll() is None else f", exited {proc.returncode}"
    raise RuntimeError(f"{proc.args!r} did not answer ({last}{exited}); {tails}")
