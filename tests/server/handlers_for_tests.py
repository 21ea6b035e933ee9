"""RPC handlers loaded by the server tests with ``--handlers handlers_for_tests``."""

import os


def boom(params):
    raise ValueError(f"boom {params}")


def die(params):
    os._exit(7)  # a worker crash, for the respawn tests


def add(params):
    return params["a"] + params["b"]


HANDLERS = {"boom": boom, "die": die, "add": add}
NOT_A_DICT = [1, 2]
