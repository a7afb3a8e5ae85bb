"""A proxy the peers bench started: its process, port and log (harness.wait_ready waits for its
first 200)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Started:
    proc: subprocess.Popen[bytes]
    port: int
    version: str
    log: Path
