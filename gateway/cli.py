"""The ``gateway`` command: ``check`` a config, run the ``demo``.

``main(argv) -> int`` never lets a traceback out for bad input: a bad command line or config is
exit status 2 with one line per problem on stderr. Only the CLI configures logging (JSON lines
on stderr); the library never does.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from gateway.config import load_config
from gateway.errors import ConfigError

__all__ = ["main"]

EXIT_OK = 0
EXIT_USAGE = 2  # bad command line or config, as the contract says


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and no exit from inside."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (``sys.argv[1:]`` when None); return the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help and --version print and exit 0
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    status: int = args.run(args)
    return status


def _build_parser() -> _Parser:
    parser = _Parser(prog="gateway", description="Rate limits and Idempotency-Key deduplication.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("file", metavar="FILE", help="a gateway TOML config")
    check.set_defaults(run=_check)

    demo = commands.add_parser("demo", help="run a small API behind the gateway on memory://")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    demo.add_argument("--port", type=_port, default=8080, help="port to listen on (8080)")
    demo.set_defaults(run=_demo)
    return parser


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        msg = f"expected a port between 0 and 65535, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return int(text)


def _check(args: argparse.Namespace) -> int:
    try:
        load_config(args.file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.file}: ok")
    return EXIT_OK


def _listen(host: str, port: int) -> socket.socket:
    """Bind before anything is printed, so a busy port is one clear line, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        msg = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        raise _UsageError(msg) from None
    sock.listen(2048)
    return sock


def _demo(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.demo import build_demo_app, curl_lines
    from gateway.logs import install_json_logging

    try:
        sock = _listen(args.host, args.port)
    except _UsageError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_USAGE
    host, port = sock.getsockname()[:2]
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    install_json_logging()
    print(f"gateway demo on {base} - a small API behind the gateway, embedded memory:// store")
    print("policy per-client: 5 requests per minute per client (burst 5) on /hello")
    print("POST /charges needs an Idempotency-Key: a retry is replayed, never charged twice\n")
    for line in curl_lines(base):
        print(f"  {line}")
    print("\nCtrl-C stops it.", flush=True)
    config = uvicorn.Config(build_demo_app(), log_level="warning", lifespan="on")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return EXIT_OK
