"""A target that serves ping at once but announces readiness late: ``python late_announcer.py PORT GO_FILE``.

It prints its fdcluster-ready line only once GO_FILE exists (or after a
bound of ANNOUNCE_DEADLINE seconds), then lives LIFETIME seconds, so a test
can tell whether ``start_target`` waited for the line or returned on port
and ping alone.  Run by tests/integration/test_ready_line.py; never imported.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from protocol_server import accept_forever, listen

#: Bound on the wait for GO_FILE, should the test fail before creating it.
ANNOUNCE_DEADLINE = 30.0
#: Bound on the target's life after announcing, should the test fail to stop it.
LIFETIME = 60.0


def main() -> None:
    port, go = int(sys.argv[1]), sys.argv[2]
    listener = listen(port)
    threading.Thread(target=accept_forever, args=(listener,), daemon=True).start()
    deadline = time.monotonic() + ANNOUNCE_DEADLINE
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)  # polls a file the test creates; nothing to wait on instead
    info = {"host": "127.0.0.1", "port": port, "pid": os.getpid(), "workers": []}
    print("fdcluster-ready " + json.dumps(info), flush=True)
    time.sleep(LIFETIME)


if __name__ == "__main__":
    main()
