"""A worker's last step after its drain: whatever still runs is cancelled, and a task that will
not end does not keep the process alive (asyncio.run would wait for it forever)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent("""
    import asyncio, logging, sys
    from router.server import _end_leftover_tasks

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    async def stubborn():
        while True:  # swallows every cancellation, as a buggy task could
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                pass

    async def polite():
        await asyncio.sleep(60)

    async def main(stuck):
        tasks = [asyncio.create_task(polite(), name="polite")]
        if stuck:
            tasks.append(asyncio.create_task(stubborn(), name="stubborn"))
        await asyncio.sleep(0.05)
        await _end_leftover_tasks(0.3)
        print("returned", [t.cancelled() for t in tasks], flush=True)

    asyncio.run(main(sys.argv[1] == "stuck"))
""")


def run(mode: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                          timeout=30)
    return done, time.monotonic() - start


def test_cancelled_tasks_end_and_the_worker_returns() -> None:
    done, _ = run("polite")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "returned [True]"
    assert "did not end" not in done.stderr


def test_a_task_that_ignores_cancellation_is_named_and_the_process_still_exits() -> None:
    done, took = run("stuck")
    assert done.returncode == 0, done.stderr
    assert took < 15
    assert "returned" not in done.stdout  # ended there, not through asyncio.run's teardown
    line = next(x for x in done.stderr.splitlines() if "did not end" in x)
    assert line.startswith("task stubborn did not end when cancelled; it waits in ")
    assert "stubborn" in line.split("waits in ")[1] and "sleep" in line
