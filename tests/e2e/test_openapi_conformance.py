"""The served OpenAPI document against the router's behaviour: schemathesis generates schema-valid
and schema-violating requests for every operation (with an admin key, so protected operations are
reachable) and runs all its checks on each answer: no 5xx, every status and body documented,
valid input accepted, invalid input refused.

Bounded and repeatable: a fixed number of examples per operation, derandomized, no example
database; about a minute on two loaded cores.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import orjson
import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, assume, settings

from router import usage
from router.errors import ValidationFailed
from router.routes import openapi_document
from router.schema import with_routes
from tests.conftest import ADMIN_KEY, ADMIN_KEY_ENTRY
from tests.e2e.conftest import ROOT, free_port

ROUTES = ("chat", "other")
EXAMPLES_PER_OPERATION = 350

def beyond_json_schema(case: schemathesis.Case) -> bool:
    """A usage report whose two instants are each valid but break the window rule (`to` after
    `from`, at most 366 days apart): a rule across two parameters, which JSON Schema cannot
    state (the document says it in words). Anything else about the instants is checked."""
    if case.operation.path != "/api/v1/admin/usage" or not case.query:
        return False
    query = {name: str(value) for name, value in case.query.items() if value is not None}
    if any(query.get(name) and usage.instant(query[name]) is None for name in ("from", "to")):
        return False
    try:
        usage.report_window(query, time.time())
    except ValidationFailed:
        return True
    return False


DOCUMENT = with_routes(openapi_document(), ROUTES)
CONFIG = schemathesis.Config.from_dict({
    # Unknown query parameters are ignored, as HTTP servers do, and OpenAPI has no way to say so.
    "generation": {"allow-extra-parameters": False},
    # 413 is a rejection too: a schema-violating body past the endpoint's cap (e.g. 1,025
    # model names of 256 characters) is refused before it is parsed.
    "checks": {"negative_data_rejection": {"expected-statuses": [
        "400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]}},
})
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)


@pytest.fixture(scope="module")
def live_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`router serve` with the in-memory store, two mock routes and one admin key."""
    tmp = tmp_path_factory.mktemp("conformance")
    config = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 2, "reload_poll_s": 0},
        "store": {"url": "memory://"},
        "auth": {"api_keys": [ADMIN_KEY_ENTRY]},
        "providers": {"mock": {"type": "mock", "chunks": 3}},
        "routes": {name: {"backends": [{"provider": "mock", "model": "m"}]} for name in ROUTES},
        "default_route": ROUTES[0],
        "health": {"enabled": False},
        "logging": {"level": "warning", "format": "text"},
    }
    path = tmp / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (tmp / "router.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", "serve", "--config", str(path), "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("router did not start:\n"
                                     + (tmp / "router.log").read_text()[-3000:])
            time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_the_served_document_is_the_one_under_test(live_router: str) -> None:
    served = requests.get(live_router + "/openapi.json", timeout=5)
    assert served.status_code == 200
    assert orjson.loads(served.content) == orjson.loads(orjson.dumps(DOCUMENT))


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_matches_its_document(case: schemathesis.Case, live_router: str) -> None:
    assume(not beyond_json_schema(case))
    case.call_and_validate(base_url=live_router, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                           timeout=10)
