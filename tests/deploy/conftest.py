"""`router serve` subprocesses for the deploy tests (the e2e tests' fixture)."""

from tests.e2e.conftest import router_process as router_process
