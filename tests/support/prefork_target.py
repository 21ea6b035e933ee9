"""A tiny Python prefork target whose options switch on misbehaviours: ``python prefork_target.py --workers N``.

Workers accept on the master's listening socket (shared accept) and serve
with ``protocol_server``.  Options:

    --port PORT          listen here (default 0: any free port, for --ready-line)
    --fork N             fork only N workers, whatever --workers says
    --worker-delay S     fork the workers only after S seconds
    --master-serves      the master accepts and answers too, from the start
    --ready-line         print the fdcluster-ready line once the workers are forked
    --ignore-term        master and workers ignore SIGTERM
    --term-exit STATUS   the master's exit status after SIGTERM
    --abandon-workers    the master exits on SIGTERM without stopping its workers
    --new-group          each worker moves to a process group of its own

Run by tests/integration/test_target.py; never imported.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from typing import List

from protocol_server import accept_forever, listen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--fork", type=int, help="workers actually forked (default: --workers)")
    parser.add_argument("--worker-delay", type=float, default=0.0)
    parser.add_argument("--master-serves", action="store_true")
    parser.add_argument("--ready-line", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--term-exit", type=int, default=0, help="the master's exit status after SIGTERM")
    parser.add_argument("--abandon-workers", action="store_true")
    parser.add_argument("--new-group", action="store_true")
    args = parser.parse_args()

    listener = listen(args.port)
    workers: List[int] = []

    def on_term(signum: int, frame: object) -> None:
        if not args.abandon_workers:
            for pid in workers:
                os.kill(pid, signal.SIGTERM)
            for pid in workers:
                os.waitpid(pid, 0)
        os._exit(args.term_exit)

    # Installed before forking so an early SIGTERM already takes the orderly path.
    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_term else on_term)
    if args.master_serves:
        threading.Thread(target=accept_forever, args=(listener,), daemon=True).start()
    if args.worker_delay:
        time.sleep(args.worker_delay)
    for _ in range(args.workers if args.fork is None else args.fork):
        pid = os.fork()
        if pid == 0:
            try:
                if not args.ignore_term:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                if args.new_group:
                    os.setpgid(0, 0)
                accept_forever(listener)
            finally:
                os._exit(0)
        workers.append(pid)
    if args.ready_line:
        info = {"host": "127.0.0.1", "port": listener.getsockname()[1], "pid": os.getpid(),
                "workers": workers, "strategy": "shared-accept", "control": "@prefork-test"}
        print("fdcluster-ready " + json.dumps(info), flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
