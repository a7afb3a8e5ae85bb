"""Command line: `router serve | check-config | bench`. Errors go to stderr, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
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

    token = sub.add_parser("token", help="router JWTs")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    issue = token_sub.add_parser("issue", help="print a router JWT signed with auth.jwt")
    issue.add_argument("--config", required=True, help="YAML config file")
    issue.add_argument("--sub", required=True, help="the token's subject (user)")
    issue.add_argument("--ttl", type=int, help="lifetime in seconds (at most auth.jwt.ttl_s)")
    issue.add_argument("--scope", default="", help="space-separated scopes")
    issue.add_argument("--admin", action="store_true", help="an admin token")

    sub.add_parser("bench", help="direct-vs-router benchmark (tests/bench; --help for its flags)")
    return parser


def _issue_token(args: argparse.Namespace) -> int:
    from router.auth import Principal, RouterTokens

    config = load_config(args.config)
    if config.auth.jwt is None:
        print(f"router token issue: {args.config} has no auth.jwt section", file=sys.stderr)
        return 1
    tokens = RouterTokens(config.auth.jwt, config.auth.default_limits)
    if not tokens.can_issue:
        print("router token issue: auth.jwt has no private_key_file to sign with",
              file=sys.stderr)
        return 1
    principal = Principal(id=f"jwt:{args.sub}", kind="router_jwt", user=args.sub,
                          limits=config.auth.default_limits, models=None, admin=args.admin,
                          scopes=frozenset(args.scope.split()))
    token, _ = tokens.issue(principal, args.ttl)
    print(token)
    return 0


def _bench(argv: list[str]) -> int:
    sys.path.insert(0, os.getcwd())  # the benchmark lives in the checkout, not the package
    try:
        bench = importlib.import_module("tests.bench.__main__")
    except ImportError:
        print("router bench: run it from a source checkout (it lives in tests/bench)",
              file=sys.stderr)
        return 2
    return int(bench.main(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])  # its own flags: argparse's REMAINDER would eat none of them
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            load_config(args.file)
            print(f"{args.file}: ok")
            return 0
        if args.command == "token":
            return _issue_token(args)
        if args.command == "serve":
            from router.server import Overrides, serve

            overrides = Overrides(args.host, args.port, args.workers)
            return serve(args.config, overrides, worker=args.worker)
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
