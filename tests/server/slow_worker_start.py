"""Loaded with ``--handlers slow_worker_start``: each new worker waits before installing its signal handlers.

It widens the window between ``fork()`` and the worker's own handlers, where a
signal used to hit the handlers copied from the master and be lost.  The patch
is applied in the master, before any fork, so every worker inherits it.
"""

import time

from fdcluster_server.worker import Worker

START_DELAY = 0.5
_install_signals = Worker.install_signals


def slow_install_signals(self):
    time.sleep(START_DELAY)
    _install_signals(self)


Worker.install_signals = slow_install_signals
HANDLERS: dict = {}
