"""Command line of the reference server: ``python -m fdcluster_server --help``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, List, Optional, Tuple, TypeVar

from . import __version__, handlers
from .config import EXIT_USAGE, READY_TAG, ServerConfig, default_workers
from .dispatch import STRATEGIES
from .master import Master
from .protocol import DEFAULT_MAX_FRAME

Number = TypeVar("Number", int, float)


def _checked(convert: Callable[[str], Number], valid: Callable[[Number], bool], kind: str,
             expected: Optional[str] = None) -> Callable[[str], Number]:
    """An argparse ``type``: ``convert`` the text, then reject what is not ``valid``.

    Its errors read "expected KIND, got 'x'" when the text does not convert,
    "expected EXPECTED, got 'x'" (EXPECTED defaults to KIND) when it is out of range.
    """

    def parse(text: str) -> Number:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected or kind}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda n: n >= 1, "a positive integer")
_port = _checked(int, lambda n: 0 <= n <= 65535, "a port number 0-65535")
_seconds = _checked(float, lambda x: x > 0, "a number of seconds", "a positive number of seconds")


_seconds_or_off = _checked(float, lambda x: 0 <= x < float("inf"), "a number of seconds",
                          "a number of seconds, 0 for never")


def _count_or_auto(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fdcluster_server",
        description="Reference prefork RPC server: the master accepts, hands each client socket to a worker "
        "over a Unix socketpair (SCM_RIGHTS) and keeps it until the worker acknowledges it.",
        epilog=f"Once every worker is up, one line is printed on stdout: '{READY_TAG} {{json}}' "
        "with host, port, pid, workers, strategy, control and nofile (the descriptor limit, raised to the hard "
        "limit at start).",
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=_port, default=0, help="TCP port; 0 picks a free one (default: 0)")
    parser.add_argument("--workers", type=_positive_int, default=default_workers(),
                        help="worker processes (default: CPU count)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=STRATEGIES[0],
                        help="how connections reach workers (default: round-robin)")
    parser.add_argument("--max-frame", type=_positive_int, default=DEFAULT_MAX_FRAME,
                        help="largest frame body in bytes (default: 1 MiB)")
    parser.add_argument("--idle-timeout", type=_seconds, default=10.0,
                        help="close a connection whose incomplete frame is older than this (default: 10 s)")
    parser.add_argument("--keepalive-timeout", type=_seconds_or_off, default=60.0,
                        help="close a connection with nothing in flight for this long; 0: never (default: 60 s)")
    parser.add_argument("--write-timeout", type=_seconds_or_off, default=30.0,
                        help="close a connection whose output made no progress for this long; 0: never (default: 30 s)")
    parser.add_argument("--max-connections-per-worker", type=_count_or_auto, default=0, metavar="N",
                        help="a worker holding N connections rejects more; 0: descriptor limit less 64 (default: 0)")
    parser.add_argument("--max-output-per-worker", type=_positive_int, default=64 << 20, metavar="BYTES",
                        help="while a worker buffers more output than this, it reads no requests (default: 64 MiB)")
    parser.add_argument("--graceful-timeout", type=_seconds, default=10.0,
                        help="after SIGTERM, how long workers may finish in-flight requests (default: 10 s)")
    parser.add_argument("--handoff-window", type=_positive_int, default=4,
                        help="unacknowledged handoffs per worker before it is skipped (default: 4)")
    parser.add_argument("--max-pending", type=_positive_int, default=1024,
                        help="accepted connections waiting for a worker before accepting pauses (default: 1024)")
    parser.add_argument("--heartbeat-timeout", type=_seconds_or_off, default=0.0, metavar="SECONDS",
                        help="kill a worker that sends no heartbeat for this long, stuck in a handler say; its "
                        "unacknowledged connections go to other workers (default: 0, off)")
    parser.add_argument("--backlog", type=_positive_int, default=1024, help="listen() backlog (default: 1024)")
    parser.add_argument("--handlers", action="append", default=[], metavar="MODULE[:NAME]",
                        help="add RPC methods from a dict of name -> callable (default NAME: HANDLERS); repeatable")
    parser.add_argument("--control", default=None, metavar="PATH",
                        help="Unix socket answering 'stats', 'workers' and 'ping' to the master's own uid "
                        "(default: abstract @fdcluster-PID-<random hex> on Linux; 'none' disables)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="stderr log level (default: info)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_config(argv: Optional[List[str]] = None) -> Tuple[ServerConfig, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    control = "" if args.control == "none" else args.control
    config = ServerConfig(
        host=args.host, port=args.port, workers=args.workers, strategy=args.strategy, max_frame=args.max_frame,
        idle_timeout=args.idle_timeout, graceful_timeout=args.graceful_timeout, handoff_window=args.handoff_window,
        max_pending=args.max_pending, backlog=args.backlog, handlers=args.handlers, control=control,
        keepalive_timeout=args.keepalive_timeout, write_timeout=args.write_timeout,
        max_connections_per_worker=args.max_connections_per_worker, max_output_per_worker=args.max_output_per_worker,
        heartbeat_timeout=args.heartbeat_timeout,
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
