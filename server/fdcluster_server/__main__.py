"""Command line of the reference server: ``python -m fdcluster_server --help``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from . import __version__, handlers
from .config import EXIT_USAGE, READY_TAG, ServerConfig, default_workers
from .dispatch import STRATEGIES
from .master import Master
from .protocol import DEFAULT_MAX_FRAME


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _seconds_or_off(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds, 0 for never, got {text!r}")
    return value


def _count_or_auto(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fdcluster_server",
        description="Reference prefork RPC server: the master accepts, hands each client socket to a worker "
        "over a Unix socketpair (SCM_RIGHTS) and keeps it until the worker acknowledges it.",
        epilog=f"Once every worker is up, one line is printed on stdout: '{READY_TAG} {{json}}' "
        "with host, port, pid, workers, strategy and control.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=_port, default=0, help="TCP port; 0 picks a free one (default: 0)")
    parser.add_argument("--workers", type=_positive_int, default=default_workers(), help="worker processes (default: CPU count)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=STRATEGIES[0], help="how connections reach workers (default: round-robin)")
    parser.add_argument("--max-frame", type=_positive_int, default=DEFAULT_MAX_FRAME, help="largest frame body in bytes (default: 1 MiB)")
    parser.add_argument("--idle-timeout", type=_seconds, default=10.0, help="close a connection whose incomplete frame is older than this (default: 10 s)")
    parser.add_argument("--keepalive-timeout", type=_seconds_or_off, default=60.0,
                        help="close a connection with nothing in flight for this long; 0: never (default: 60 s)")
    parser.add_argument("--write-timeout", type=_seconds_or_off, default=30.0,
                        help="close a connection whose output made no progress for this long; 0: never (default: 30 s)")
    parser.add_argument("--max-connections-per-worker", type=_count_or_auto, default=0, metavar="N",
                        help="a worker holding N connections rejects more; 0: descriptor limit less 64 (default: 0)")
    parser.add_argument("--max-output-per-worker", type=_positive_int, default=64 << 20, metavar="BYTES",
                        help="while a worker buffers more output than this, it reads no requests (default: 64 MiB)")
    parser.add_argument("--graceful-timeout", type=_seconds, default=10.0, help="after SIGTERM, how long workers may finish in-flight requests (default: 10 s)")
    parser.add_argument("--handoff-window", type=_positive_int, default=4, help="unacknowledged handoffs per worker before it is skipped (default: 4)")
    parser.add_argument("--max-pending", type=_positive_int, default=1024, help="accepted connections waiting for a worker before accepting pauses (default: 1024)")
    parser.add_argument("--backlog", type=_positive_int, default=1024, help="listen() backlog (default: 1024)")
    parser.add_argument("--handlers", action="append", default=[], metavar="MODULE[:NAME]",
                        help="add RPC methods from a dict of name -> callable (default NAME: HANDLERS); repeatable")
    parser.add_argument("--control", default=None, metavar="PATH",
                        help="Unix socket answering 'stats' (default: abstract @fdcluster-PID on Linux; 'none' disables)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="stderr log level (default: info)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_config(argv: Optional[List[str]] = None) -> "tuple[ServerConfig, argparse.Namespace]":
    parser = build_parser()
    args = parser.parse_args(argv)
    control = "" if args.control == "none" else args.control
    config = ServerConfig(
        host=args.host, port=args.port, workers=args.workers, strategy=args.strategy, max_frame=args.max_frame,
        idle_timeout=args.idle_timeout, graceful_timeout=args.graceful_timeout, handoff_window=args.handoff_window,
        max_pending=args.max_pending, backlog=args.backlog, handlers=args.handlers, control=control,
        keepalive_timeout=args.keepalive_timeout, write_timeout=args.write_timeout,
        max_connections_per_worker=args.max_connections_per_worker, max_output_per_worker=args.max_output_per_worker,
    )
    return config, args


def main(argv: Optional[List[str]] = None) -> int:
    config, args = parse_config(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s")
    try:
        table = handlers.build(config.handlers)
    except handlers.HandlerSpecError as exc:
        build_parser().error(f"argument --handlers: {exc}")  # exits 2
        return EXIT_USAGE
    return Master(config, table).run()


if __name__ == "__main__":
    sys.exit(main())
