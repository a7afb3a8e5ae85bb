"""`router serve` for the auth-cost figures, with one extra bench-only credential.

``python -m router.bench.auth_router --config FILE --port N`` serves exactly like
``router serve``, except that ``Authorization: Bearer bench-no-auth`` skips authentication and
yields a fixed principal: the router-without-auth baseline, measured in the same process, warm,
next to every real credential. The hook costs one list compare and one coroutine frame; the real
credentials pay that frame too (under 1 µs), so their figures err high by that much at most.

The hook also sums the thread CPU time spent authenticating; SIGUSR1 prints the running totals
as one line, ``AUTHSTATS <calls> <seconds>``, on stderr. Never used outside the benchmark.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

from router.auth import Authenticator, Principal
from router.config import Limits

BYPASS = "bench-no-auth"


def install_bypass() -> None:
    original = Authenticator.authenticate
    header = [f"Bearer {BYPASS}"]
    principal = Principal(id="bench-no-auth", kind="api_key", user="bench", limits=Limits(),
                          models=None)
    clock = time.thread_time
    totals = [0, 0.0]

    async def authenticate(self: Authenticator, headers: list[str]) -> Principal:
        started = clock()
        try:
            if headers == header:
                return principal
            return await original(self, headers)
        finally:
            totals[0] += 1
            totals[1] += clock() - started

    def report(signum: int, frame: FrameType | None) -> None:
        print(f"AUTHSTATS {totals[0]} {totals[1]:.9f}", file=sys.stderr, flush=True)

    Authenticator.authenticate = authenticate  # type: ignore[method-assign]
    signal.signal(signal.SIGUSR1, report)


def main(argv: Sequence[str]) -> int:
    install_bypass()
    from router.cli import main as cli_main

    return cli_main(["serve", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
