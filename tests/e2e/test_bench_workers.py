"""`router bench --workers` end to end with tiny phases: one pinned worker and a supervisor of
two, every feature on; the table's rows hold what each used, counted from the workers' CPU
(not the idle supervisor's), and no request failed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from router.bench import workers_cost
from router.bench.harness import Machine, processes
from router.bench.plan import parse


@pytest.mark.timeout(90)
def test_workers_bench_rows(tmp_path: Path) -> None:
    plan = dataclasses.replace(parse(["--workers-only", "--quick", "--connections", "8"]),
                               workers_phase_s=1.0)
    notes: list[str] = []
    # Unpinned and without wrk: the Python client's closed loop takes short phases.
    with processes() as procs:
        rows = workers_cost.run(procs, Machine(pinned=False, wrk=None), tmp_path, plan, notes)

    assert [row[0] for row in rows] == ["1 worker (pinned to one CPU)", "2 workers (both CPUs)"]
    for row in rows:
        cells = dict(zip(workers_cost.COLUMNS, row, strict=True))
        assert float(cells["req/s"].replace(",", "")) > 50
        assert float(cells["router cores"]) > 0.05  # the workers' CPU, read through the tree
        assert cells["router CPU/req"].endswith(" µs")
    assert rows[1][2].endswith("x") and "2 cores:" in rows[1][-1]
    assert not [n for n in notes if "failed" in n or "exited" in n], notes
