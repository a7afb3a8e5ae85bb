"""The deployment files are valid for the tools that read them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus) absent")
def test_prometheus_config_is_valid():
    result = subprocess.run(["promtool", "check", "config", str(ROOT / "deploy/prometheus.yml")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
