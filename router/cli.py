"""Command line: `router serve | check-config | bench`. Errors go to stderr, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from router.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="router", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the API from a config file")
    serve.add_argument("--config", required=True, help="YAML config file")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--workers", type=int, help="override server.workers")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)

    check = sub.add_parser("check-config", help="validate a config file; exit 1 on problems")
    check.add_argument("file")

    bench = sub.add_parser("bench", help="direct-vs-router benchmark (see tests/bench)")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            load_config(args.file)
            print(f"{args.file}: ok")
            return 0
        if args.command == "serve":
            from router.server import Overrides, serve

            overrides = Overrides(args.host, args.port, args.workers)
            return serve(args.config, overrides, worker=args.worker)
        if args.command == "bench":
            try:
                bench = importlib.import_module("tests.bench.__main__")
            except ImportError:
                print("router bench: run it from a source checkout (tests/bench)",
                      file=sys.stderr)
                return 2
            return int(bench.main(args.args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem.render(exc.source), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"router: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 2
