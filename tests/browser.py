"""A real browser for the tests: Debian's `chromium`, headless, driven over the Chrome DevTools
Protocol on its websocket with aiohttp (no Selenium, no Playwright). `make test` installs
chromium when missing and root; a test without it is skipped, saying why."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 15.0


def chromium() -> str | None:
    """The browser's path, if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One tab: commands by name, each awaited for its answer; events are kept by method."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = msg.json()
            waiter = self._waiting.pop(data.get("id", -1), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(data)
            elif "method" in data:
                self.events.append(data)
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("the browser closed the connection"))

    async def call(self, method: str, **params: Any) -> Any:
        call_id = next(self._ids)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = answer
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        data = await asyncio.wait_for(answer, CALL_TIMEOUT_S)
        if "error" in data:
            raise AssertionError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        """A JavaScript expression's value (JSON-able), awaited if it is a promise."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, within_s: float = 10.0) -> Any:
        """Evaluate until the value is truthy; return it."""
        deadline = time.monotonic() + within_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression!r} not true within {within_s} s")
            await asyncio.sleep(0.05)

    async def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element `selector` names."""
        box = await self.evaluate(
            f"(() => {{ const e = document.querySelector({selector!r}); if (!e) return null;"
            f" e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();"
            f" return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        assert box is not None, f"no element {selector!r}"
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                            clickCount=1)

    async def type_into(self, selector: str, text: str) -> None:
        """Focus the element and type `text` as keyboard input would."""
        await self.click(selector)
        await self.call("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> Path:
        shot = await self.call("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def headless(binary: str, workdir: Path, *, width: int = 1366, height: int = 768
                   ) -> AsyncIterator[Page]:
    """Chromium with a fresh profile in `workdir`; yields its first tab at a laptop's size."""
    profile = workdir / "profile"
    profile.mkdir(parents=True, exist_ok=True)
    log = (workdir / "chromium.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--no-default-browser-check", "--disable-extensions",
        "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
        f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank",
        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    page: Page | None = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists() or not port_file.read_text().strip():
            if proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError("chromium did not start:\n"
                                     + (workdir / "chromium.log").read_text()[-3000:])
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            tab = next(t for t in targets if t["type"] == "page")
            ws = await http.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=64 << 20)
            page = Page(ws)
            await page.call("Page.enable")
            await page.call("Runtime.enable")
            await page.call("Log.enable")
            await page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                            deviceScaleFactor=1, mobile=False)
            yield page
    finally:
        if page is not None:
            await page.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        log.close()
