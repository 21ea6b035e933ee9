"""RPC handlers loaded by the server tests with ``--handlers handlers_for_tests``."""

import os
import time


def boom(params):
    raise ValueError(f"boom {params}")


def die(params):
    os._exit(7)  # a worker crash, for the respawn tests


def hang(params):
    """Stuck in a handler, for the heartbeat watchdog; first creates the file named by ``params``, if any."""
    if params:
        with open(params, "w"):
            pass  # tells the test the worker is stuck from now on
    time.sleep(3600)  # killed long before this returns


def add(params):
    return params["a"] + params["b"]


HANDLERS = {"boom": boom, "die": die, "add": add, "hang": hang}
NOT_A_DICT = [1, 2]
