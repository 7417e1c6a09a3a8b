"""The ``gateway`` command: ``serve`` the reverse proxy, ``check`` a config, run the ``demo``.

``main(argv) -> int`` never lets a traceback out for bad input: a bad command line or config is
exit status 2 with one line per problem on stderr. Only the CLI configures logging (JSON lines
on stderr); the library never does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from gateway.config import Config, StoreConfig, load_config
from gateway.errors import ConfigError

__all__ = ["main"]

EXIT_OK = 0
EXIT_USAGE = 2  # bad command line or config, as the contract says
EXIT_FAILED = 1  # the server could not start for another reason


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

    serve = commands.add_parser("serve", help="run the reverse proxy from a config file")
    serve.add_argument("--config", required=True, metavar="FILE", help="a gateway TOML config")
    serve.add_argument("--host", help="address to listen on (overrides [server] host)")
    serve.add_argument("--port", type=_port, help="port to listen on (overrides [server] port)")
    serve.add_argument("--workers", type=_workers, help="worker processes (overrides [server] workers)")
    serve.add_argument("--access-log", action="store_true",
                       help="one JSON line per response (event http.access: client, method, path, status)")
    serve.add_argument("--log-level", type=_log_level, default="info", metavar="LEVEL",
                       help="the gateway's own records: debug, info (default: every decision worth "
                            "knowing), warning or error; debug shows uvicorn's too")
    serve.set_defaults(run=_serve)

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


def _log_level(text: str) -> str:
    if text.lower() not in ("debug", "info", "warning", "error"):
        msg = f"expected debug, info, warning or error, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return text.lower()


def _workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 512:
        msg = f"expected a number of workers between 1 and 512, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return int(text)


def _load(path: str) -> Config | None:
    """The config at ``path``, or None after printing one line per problem."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    if _load(args.file) is None:
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
    os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "true")  # as serve does
    import uvicorn

    from gateway.demo import build_demo_app, curl_lines
    from gateway.http_protocol import GatewayHttpProtocol
    from gateway.logs import install_json_logging, uvicorn_log_config

    try:
        sock = _listen(args.host, args.port)
    except _UsageError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_USAGE
    base = _base_url(*sock.getsockname()[:2])
    install_json_logging()
    print(f"gateway demo on {base} - a small API behind the gateway, embedded memory:// store")
    print("policy per-client: 5 requests per minute per client (burst 5) on /hello")
    print("POST /charges needs an Idempotency-Key: a retry is replayed, never charged twice\n")
    for line in curl_lines(base):
        print(f"  {line}")
    print("\nCtrl-C stops it.", flush=True)
    # proxy_headers off: the gateway, not uvicorn, decides whose X-Forwarded-For to believe
    config = uvicorn.Config(build_demo_app(), log_config=uvicorn_log_config(), log_level="warning",
                            lifespan="on", proxy_headers=False, http=GatewayHttpProtocol)
    try:
        with _stopping_is_success():
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    # one worker or many, a scrape shows the same series: multiprocess mode has no *_created
    # gauges, so single-process mode does without them too (read when prometheus_client loads)
    os.environ.setdefault("PROMETHEUS_DISABLE_CREATED_SERIES", "true")
    import uvicorn

    from gateway.server import ENV_CONFIG, ENV_LOG_LEVEL, uvicorn_options

    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    workers = args.workers or config.server.workers
    if workers > 1 and config.store.url == "memory://":
        print(f'store.url: "memory://" keeps limits and records in one process; {workers} workers '
              "need a shared store (redis://...)", file=sys.stderr)
        return EXIT_USAGE
    try:
        sock = _listen(host, port)
    except _UsageError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_USAGE
    bound_host, bound_port = sock.getsockname()[:2]
    os.environ[ENV_CONFIG] = os.path.abspath(args.config)
    os.environ[ENV_LOG_LEVEL] = args.log_level  # every worker's gateway logger
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # set before any worker imports prometheus_client: every worker writes its values there
        metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    print(f"gateway serve on {_base_url(bound_host, bound_port)} -> {config.upstream.url} "
          f"(store {_store_line(config.store)}), {workers} worker{'s' if workers > 1 else ''}", flush=True)
    options: dict[str, Any] = uvicorn_options(config, access_log=args.access_log, log_level=args.log_level)
    uv_config = uvicorn.Config("gateway.server:create_app", factory=True, workers=workers, **options)
    try:
        server = uvicorn.Server(uv_config)
        with _stopping_is_success():
            if workers > 1:
                _supervise(uv_config, server, sock)
            else:
                server.run(sockets=[sock])
    finally:
        sock.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if workers == 1 and not server.started:
        print("gateway: the server did not start (see the log lines above)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


@contextlib.contextmanager
def _stopping_is_success() -> Iterator[None]:
    """SIGTERM and SIGINT stop the server gracefully, and then the command exits 0.

    uvicorn drains, then re-raises the signal it caught to the handler that was there before it;
    with the default handlers the process would die of it (exit 143, or a KeyboardInterrupt
    traceback). A stop that was asked for and went cleanly is a success."""
    stops = (signal.SIGTERM, signal.SIGINT)
    before = {sig: signal.signal(sig, lambda *_: None) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _supervise(uv_config: Any, server: Any, sock: socket.socket) -> None:
    """uvicorn's worker supervisor (its signature lost ``target`` in later releases)."""
    import inspect

    from uvicorn.supervisors import Multiprocess

    kwargs: dict[str, Any] = {"sockets": [sock]}
    if "target" in inspect.signature(Multiprocess).parameters:
        kwargs["target"] = server.run
    Multiprocess(uv_config, **kwargs).run()


def _base_url(host: str, port: int) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def _store_line(store: StoreConfig) -> str:
    """The store as the startup line names it: its URL (password masked), and what it is."""
    if store.sentinels:
        return f"master {store.service_name!r} from sentinels {', '.join(store.sentinels)}"
    return _redacted(store.url) + (" cluster" if store.cluster else "")


def _redacted(url: str) -> str:
    """``url`` without a password: the startup line must not leak the store's secret."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
