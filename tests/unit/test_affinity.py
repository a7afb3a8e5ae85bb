"""Prefix affinity: which part of a prompt makes its key, that the key is bounded and the same
in every process, and where keys go as backends fill up, rest or come back."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from typing import Any

import orjson

from router.config import MockProviderConfig
from router.config.model import RouteConfig
from router.metrics import Metrics
from router.providers.mock import MockProvider
from router.routing.affinity import MAX_PREFIX_BYTES, leading, prefix_key
from router.routing.health import BackendState
from router.routing.strategies import rendezvous_order, rendezvous_place
from router.routing.table import Backend, Route

_PROVIDER = MockProvider("mock", MockProviderConfig(type="mock"))
SYSTEM = {"role": "system", "content": "You are a careful assistant."}


def backend(name: str, *, inflight: int = 0, max_concurrency: int | None = None) -> Backend:
    return Backend(name=name, provider=_PROVIDER, model=name, weight=1.0,
                   max_concurrency=max_concurrency, state=BackendState(inflight=inflight))


def route(n: int = 4, **affinity: Any) -> Route:
    config = RouteConfig.model_validate({
        "strategy": "prefix_affinity", "affinity": affinity,
        "backends": [{"provider": "mock", "model": f"b{i}", "name": f"b{i}"} for i in range(n)]})
    return Route("r", config, tuple(backend(f"b{i}") for i in range(n)), RoundRobin())


class RoundRobin:
    def select(self, candidates: Any) -> Backend:
        return candidates[0]  # pragma: no cover - placement never asks the strategy


def chat(first: str, turns: int = 0, *, system: dict[str, str] | None = SYSTEM,
         tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [system] if system else []
    messages.append({"role": "user", "content": first})
    for k in range(turns):
        messages += [{"role": "assistant", "content": f"answer {k}"},
                     {"role": "user", "content": f"follow-up {k}"}]
    body: dict[str, Any] = {"model": "r", "messages": messages}
    if tools is not None:
        body["tools"] = tools
    return body


def affinity_counts(metrics: Metrics) -> dict[str, float]:
    return {outcome: child.value for (name, outcome), child in metrics._affinity.items()
            if name == "r"}


def test_first_user_covers_the_conversation_so_far_up_to_its_first_question():
    body = chat("Summarise the attached report.", turns=3)
    assert leading(body["messages"], "first_user") == body["messages"][:2]
    # Every later turn of the same conversation has the same key.
    keys = {prefix_key(chat("Summarise the attached report.", turns=t), "first_user")
            for t in range(6)}
    assert len(keys) == 1
    assert prefix_key(chat("Another question"), "first_user") not in keys


def test_system_takes_the_leading_system_messages_else_the_first_question():
    developer = {"role": "developer", "content": "Answer in French."}
    body = chat("q1")
    body["messages"].insert(1, developer)
    assert leading(body["messages"], "system") == [SYSTEM, developer]
    assert prefix_key(chat("q1"), "system") == prefix_key(chat("q2"), "system")
    assert prefix_key(chat("q1", system=None), "system") \
        != prefix_key(chat("q2", system=None), "system")
    assert leading(chat("q1", system=None)["messages"], "system") == \
        [{"role": "user", "content": "q1"}]


def test_a_number_takes_that_many_messages_and_no_user_message_takes_all():
    body = chat("q", turns=2)
    assert leading(body["messages"], 3) == body["messages"][:3]
    only_system = [SYSTEM, {"role": "assistant", "content": "hi"}]
    assert leading(only_system, "first_user") == only_system


def test_tools_are_part_of_the_prefix():
    tool = {"type": "function", "function": {"name": "lookup"}}
    other = {"type": "function", "function": {"name": "search"}}
    keys = {prefix_key(chat("q", tools=t), "first_user") for t in (None, [tool], [other])}
    assert len(keys) == 3


def test_the_key_reads_a_bounded_part_of_the_prompt():
    long = "x" * (2 * MAX_PREFIX_BYTES)
    # Prompts that agree past the bound share a key (and that much cache); before it, not.
    assert prefix_key(chat(long + "a"), "first_user") == prefix_key(chat(long + "b"),
                                                                      "first_user")
    assert prefix_key(chat("a" + long), "first_user") != prefix_key(chat("b" + long),
                                                                      "first_user")
    parts = {"role": "user", "content": [{"type": "text", "text": long + "a"}]}
    parts_b = {"role": "user", "content": [{"type": "text", "text": long + "b"}]}
    assert prefix_key({"messages": [parts]}, 1) == prefix_key({"messages": [parts_b]}, 1)
    assert prefix_key({"messages": []}, "first_user") is None
    assert prefix_key({}, "first_user") is None


def test_the_key_is_the_same_in_another_process():
    body = chat("the same question", turns=1, tools=[{"type": "function",
                                                        "function": {"name": "f"}}])
    code = ("import sys, orjson; from router.routing.affinity import prefix_key; "
            "print(prefix_key(orjson.loads(sys.argv[1]), 'first_user'))")
    other = subprocess.run([sys.executable, "-c", code, orjson.dumps(body).decode()],
                           capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345"})
    assert other.stdout.strip() == prefix_key(body, "first_user")


def test_outcomes_first_spill_skip():
    bs = [backend(f"b{i}") for i in range(4)]
    key = "k"
    head, second = rendezvous_order(key, bs)[:2]
    assert rendezvous_place(key, bs, bs, 1.25) == (head, "first")
    head.state.inflight = 10  # past 1.25 x its share of 11
    assert rendezvous_place(key, bs, bs, 1.25) == (second, "spill")
    rest = [b for b in bs if b is not head]
    assert rendezvous_place(key, bs, rest, 1.25) == (second, "skip")
    assert rendezvous_place(key, bs, [], 1.25) == (None, "skip")


def test_different_prefixes_spread_over_every_backend():
    r = route(4)
    metrics = Metrics()
    placed = Counter(r.affinity.place(r, chat(f"conversation {i}"), metrics).name  # type: ignore
                     for i in range(400))
    assert set(placed) == {"b0", "b1", "b2", "b3"}
    assert min(placed.values()) > 60  # 100 expected each
    assert affinity_counts(metrics) == {"first": 400}


def test_a_backend_at_its_bound_spills_and_its_prefixes_come_back():
    r = route(3, load_factor=1.25)
    metrics = Metrics()
    affinity = r.affinity
    assert affinity is not None
    bodies = [chat(f"conversation {i}") for i in range(60)]
    home = {i: affinity.place(r, b, metrics) for i, b in enumerate(bodies)}
    busy = r.backends[0]
    mine = [i for i, b in home.items() if b is busy]
    assert mine
    busy.state.inflight = 20  # the others idle: far past its share
    for i in mine:
        moved = affinity.place(r, bodies[i], metrics)
        assert moved is not busy and moved is not None
    assert affinity_counts(metrics)["spill"] == len(mine)
    # Another prefix headed elsewhere is not moved.
    assert all(affinity.place(r, bodies[i], metrics) is home[i] for i in home if i not in mine)
    busy.state.inflight = 0
    assert all(affinity.place(r, bodies[i], metrics) is busy for i in mine)


def test_an_ejected_backend_moves_its_prefixes_to_their_second_choice_and_only_those():
    r = route(4)
    metrics = Metrics()
    affinity = r.affinity
    assert affinity is not None
    bodies = [chat(f"conversation {i}", turns=i % 3) for i in range(200)]
    before = [affinity.place(r, b, metrics) for b in bodies]
    out = r.backends[2]
    out.state.ejected_until = time.monotonic() + 60
    after = [affinity.place(r, b, metrics) for b in bodies]
    moved = 0
    for body, was, now in zip(bodies, before, after, strict=True):
        if was is out:
            key = prefix_key(body, "first_user")
            assert key is not None
            assert now is rendezvous_order(key, r.backends)[1]  # its second choice, every time
            moved += 1
        else:
            assert now is was
    assert moved > 20
    assert affinity_counts(metrics)["skip"] == moved
    out.state.ejected_until = 0.0
    assert [affinity.place(r, b, metrics) for b in bodies] == before


def test_a_full_or_resting_backend_is_skipped_too():
    r = route(2)
    affinity = r.affinity
    assert affinity is not None
    r.backends[0].max_concurrency = 1
    r.backends[0].state.inflight = 1
    r.backends[1].state.rest(60)
    assert affinity.place(r, chat("q"), Metrics()) is None  # nothing with room: dispatch decides
