"""RPC handlers that misbehave on the server's side, for ``--handlers hostile_handlers``."""


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


def raise_unprintable(params):
    raise Unprintable()


def raise_surrogate(params):
    raise ValueError("a lone \ud800 in the message")


def return_nan(params):
    return float("nan")


def return_set(params):
    return {1, 2}


def return_deep(params):
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    return nested


HANDLERS = {
    "raise_unprintable": raise_unprintable,
    "raise_surrogate": raise_surrogate,
    "return_nan": return_nan,
    "return_set": return_set,
    "return_deep": return_deep,
}
