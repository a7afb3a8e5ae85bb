"""The limiter's synchronous path (the in-memory store, no session to ask): the same decisions
and headers as its awaited one, and a settlement that gives the slot back and charges what the
request really used."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.auth import Principal
from router.config import load_config
from router.config.model import Limits
from router.limits import Limiter, RateLimited, Used
from router.metrics import DisabledMetrics
from router.store.base import SessionQuery
from router.store.memory import MemoryStore

CONFIG = load_config(Path(__file__).resolve().parents[2] / "config" / "router.yaml")
BODY = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 90}


class _Ref:
    class current:  # stands for the runtime the limiter reads
        config = CONFIG


def _principal(limits: Limits) -> Principal:
    return Principal(id="k", kind="api_key", user="u", limits=limits, models=None)


async def test_admit_now_decides_settles_and_matches_admit() -> None:
    limits = Limits(rpm=100, tpm=1000, concurrency=1)
    limiter = Limiter(MemoryStore(), DisabledMetrics(), _Ref())  # type: ignore[arg-type]
    assert limiter.at_once(None)
    assert not limiter.at_once(SessionQuery("u", "s", 60))

    ticket = limiter.admit_now(_principal(limits), BODY, CONFIG)
    assert ticket is not None and ticket.lease is not None
    # 40 characters: 10 tokens of prompt, and the 90 max_tokens reserved.
    assert ticket.headers["x-ratelimit-remaining-tokens"] == "900"
    assert ticket.headers["x-ratelimit-remaining-requests"] == "99"
    with pytest.raises(RateLimited) as refused:  # the one concurrency slot is taken
        limiter.admit_now(_principal(limits), BODY, CONFIG)
    assert refused.value.code == "concurrency"

    limiter.settle(ticket, Used((10, 5), 40))  # used 15 of the 100 charged
    again = await limiter.admit(_principal(limits), BODY, CONFIG)
    assert again is not None
    # 1000 - 15 used - 100 charged now (the tokens refill by less than one meanwhile).
    assert again.headers["x-ratelimit-remaining-tokens"] == "885"


def test_admit_now_without_limits_is_no_ticket_and_refuses_a_shared_store() -> None:
    limiter = Limiter(MemoryStore(), DisabledMetrics(), _Ref())  # type: ignore[arg-type]
    assert limiter.admit_now(_principal(Limits()), BODY, CONFIG) is None

    class Elsewhere(MemoryStore):  # any store that is not this process's memory
        pass

    shared = Limiter(Elsewhere(), DisabledMetrics(), _Ref())  # type: ignore[arg-type]
    assert not shared.at_once(None)
    with pytest.raises(TypeError):
        shared.admit_now(_principal(Limits(rpm=1)), BODY, CONFIG)
