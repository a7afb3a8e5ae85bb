"""The operator console in a real browser: headless chromium loads /admin from `router serve`,
an admin key is typed in, the rendered page shows every backend with its state, and the drain
button takes a backend out of rotation. Screenshots are written for people to look at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.browser import chromium, headless
from tests.conftest import (
    ADMIN_KEY,
    ADMIN_KEY_ENTRY,
    KEY,
    USER_MSG,
    bearer,
    eventually,
    openai_provider,
)
from tests.conftest import router_config as base_config

# Every row of the backends table: [backend, state word in data-state, the text shown].
ROWS = """(() => {
  const rows = [...document.querySelectorAll('#backends tr[data-backend]')];
  return rows.length ? rows.map(r => [r.dataset.backend,
    r.querySelector('[data-state]').dataset.state,
    r.querySelector('[data-state]').textContent]) : null;
})()"""


def state_in_page(backend: str) -> str:
    return (f"(() => {{ const r = document.querySelector("
            f"'#backends tr[data-backend=\"{backend}\"]');"
            f" return r ? r.querySelector('[data-state]').dataset.state : null; }})()")


async def status(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    async with http.get(url + "/api/v1/admin/status", headers=bearer(ADMIN_KEY)) as resp:
        doc = await resp.json()
    return {b["name"]: b["state"] for b in doc["routes"]["m"]["backends"]}


async def test_the_console_shows_every_backend_and_drains_one_from_a_browser(
        fakes: Any, router_process: Any, tmp_path: Path) -> None:
    binary = chromium()
    if binary is None:
        reason = ("chromium is not installed: `make test` installs it when run as root "
                  "(apt-get install chromium)")
        print(reason)
        pytest.skip(reason)
    ups = {name: await fakes(name) for name in ("a", "c", "bad", "limited")}
    config = base_config(
        {name: openai_provider(up) for name, up in ups.items()},
        {"m": {"backends": [{"provider": "a", "model": "gpt-x"},
                            {"provider": "c", "model": "gpt-x"},
                            {"provider": "bad", "model": "status:500"},
                            {"provider": "limited", "model": "status:429+retry-after:120"}],
               "retries": 3, "ejection": {"consecutive_failures": 1, "base_cooldown_s": 120}}})
    config["auth"]["api_keys"].append(ADMIN_KEY_ENTRY)
    r = await router_process(config)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        expected = {"a/gpt-x": "up", "c/gpt-x": "up", "bad/status:500": "ejected",
                    "limited/status:429+retry-after:120": "resting"}

        async def settled() -> bool:
            # Round robin (and its retries) reaches the failing and the rate-limited backend.
            async with http.post(r.url + "/api/v1/chat/completions", headers=bearer(KEY),
                                 json={"model": "m", "messages": USER_MSG}) as resp:
                assert resp.status == 200
            return await status(http, r.url) == expected

        await eventually(settled, 10, "an ejected and a resting backend")

        async with headless(binary, tmp_path / "chromium") as page:
            await page.call("Page.navigate", url=r.url + "/admin")
            await page.until("document.readyState === 'complete' && "
                             "!document.getElementById('login').hidden")
            await page.type_into("#key", ADMIN_KEY)
            await page.click("#login-form button[type=submit]")
            rows = await page.until(ROWS)
            assert {name: state for name, state, _ in rows} == expected
            # The state is written as a word, not only as a colour.
            assert {name: text for name, _, text in rows} == {
                name: state.replace("_", " ") for name, state in expected.items()}
            # Which worker answered (one worker: the process itself).
            answered = await page.evaluate("document.getElementById('answered').textContent")
            assert f"worker pid {r.pid} of 1" in answered
            # The key stays in this tab's sessionStorage: no cookie, nothing persisted.
            assert await page.evaluate(
                "[sessionStorage.length, localStorage.length, document.cookie]") == [1, 0, ""]
            shot = await page.screenshot(tmp_path / "console.png")
            print(f"console screenshot: {shot}")

            await page.click('button[data-backend="a/gpt-x"][data-action="drain"]')
            await page.until(f"{state_in_page('a/gpt-x')} === 'drained'")
            assert (await status(http, r.url))["a/gpt-x"] == "drained"
            assert await page.evaluate(
                "document.querySelector('button[data-backend=\"a/gpt-x\"]').textContent"
                ) == "Undrain"
            shot = await page.screenshot(tmp_path / "console-drained.png")
            print(f"console screenshot after the drain: {shot}")

            await page.click('button[data-backend="a/gpt-x"][data-action="undrain"]')
            await page.until(f"{state_in_page('a/gpt-x')} === 'up'")
            # The page's own script and style ran under its policy: nothing was refused.
            refused = [e for e in page.events if e["method"] == "Runtime.exceptionThrown"
                       or "Content Security Policy" in str(e.get("params"))]
            assert not refused, refused
        assert (await status(http, r.url))["a/gpt-x"] == "up"
