"""A ConfigMap update reaches a running router without a restart. The kubelet never rewrites a
mounted file: it writes the new content into a new timestamped directory and swaps the `..data`
symlink to it (pkg/volume/util/atomic_writer.go), so `router.yaml` is a symlink to
`..data/router.yaml` whose target changes at once. This reproduces that on disk, step for step,
under a real `router serve` watching `router.yaml`."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import KEY, eventually, router_config

AUTH = {"Authorization": f"Bearer {KEY}"}


class ConfigMapVolume:
    """A ConfigMap volume's directory as the kubelet lays it out and updates it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self._n = 0

    def _new_payload_dir(self, files: dict[str, str]) -> str:
        # os.MkdirTemp(dir, "..2006_01_02_15_04_05."): a UTC timestamp and a random suffix.
        self._n += 1
        name = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + f"{os.getpid()}{self._n}"
        payload = self.root / name
        payload.mkdir(mode=0o755)
        for key, text in files.items():
            (payload / key).write_text(text)
            (payload / key).chmod(0o644)
        return name

    def create(self, files: dict[str, str]) -> None:
        payload = self._new_payload_dir(files)
        os.symlink(payload, self.root / "..data")
        for key in files:  # the user-visible names point through ..data
            os.symlink(Path("..data") / key, self.root / key)

    def update(self, files: dict[str, str]) -> None:
        old = os.readlink(self.root / "..data")
        payload = self._new_payload_dir(files)
        os.symlink(payload, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", self.root / "..data")  # the atomic swap
        shutil.rmtree(self.root / old)


def mock_config(routes: list[str], **server: Any) -> str:
    return yaml.safe_dump(router_config(
        {"mock": {"type": "mock"}},
        {name: {"backends": [{"provider": "mock", "model": f"mock-{name}"}]} for name in routes},
        server={"reload_poll_s": 0.2, **server}, logging={"level": "info", "format": "text"}))


async def models(http: aiohttp.ClientSession, url: str) -> list[str]:
    async with http.get(f"{url}/v1/models", headers=AUTH) as resp:
        assert resp.status == 200
        return sorted(m["id"] for m in (await resp.json())["data"])


async def test_the_router_follows_the_kubelets_symlink_swap(tmp_path, router_process) -> None:
    volume = ConfigMapVolume(tmp_path / "config")
    volume.create({"router.yaml": mock_config(["m"])})
    mounted = volume.root / "router.yaml"
    assert mounted.is_symlink() and os.readlink(mounted) == "..data/router.yaml"
    # `--config` given again names the mounted file (the fixture's own copy is not read).
    rp = await router_process(mock_config(["m"]), "--config", str(mounted))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        assert await models(http, rp.url) == ["m"]

        volume.update({"router.yaml": mock_config(["m", "m2"])})
        await eventually(lambda: _has(http, rp.url, ["m", "m2"]), 10, "route m2")
        await rp.wait_log("config reloaded (file changed)")

        # A bad edit is refused and the old config keeps serving.
        volume.update({"router.yaml": "routes: [this is not a config"})
        await rp.wait_log("refused; the old config keeps serving")
        assert await models(http, rp.url) == ["m", "m2"]

        # The next good edit (a third payload directory) applies.
        volume.update({"router.yaml": mock_config(["m3"])})
        await eventually(lambda: _has(http, rp.url, ["m3"]), 10, "route m3 alone")
        assert len(list(volume.root.glob("..20*"))) == 1  # old payloads removed as the kubelet does
    assert rp.log().count("config reloaded (file changed)") == 2
    assert "Traceback" not in rp.log()


async def _has(http: aiohttp.ClientSession, url: str, expected: list[str]) -> bool:
    return await models(http, url) == expected
