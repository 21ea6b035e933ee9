"""Realistic request params from Faker, reproducible from Faker's own pytest seed.

Many locales (CJK, Arabic, Cyrillic, Greek, Devanagari...), emoji, nested
objects and large strings: the shapes that find encoding and framing bugs.
The seed is the one Faker's pytest plugin uses (its ``faker_seed`` fixture,
default 0), so a failure is replayed by setting that fixture.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Dict, Iterator, List, Optional

from faker import Faker

LOCALES = ["en_US", "ja_JP", "zh_CN", "zh_TW", "ko_KR", "ar_AA", "ru_RU", "el_GR", "hi_IN", "he_IL",
           "de_DE", "fr_FR", "pt_BR", "th_TH"]
DEFAULT_SEED = 0  # Faker's pytest plugin default
LARGE_MIN = 64 * 1024


class Payloads:
    """A seeded generator of request params of every shape."""

    def __init__(self, seed: Any = DEFAULT_SEED, locales: Optional[List[str]] = None) -> None:
        self.seed = seed
        self.fake = Faker(locales or LOCALES)
        self.fake.seed_instance(seed)
        self.rng = random.Random(seed)  # a multi-locale Faker has no .random of its own
        self.shapes: Dict[str, Callable[[], Any]] = {
            "scalar": self.scalar,
            "text": self.text,
            "person": self.person,
            "nested": self.nested,
            "list": self.list,
            "large": self.large,
        }

    def _locale(self) -> Faker:
        return self.fake[self.rng.choice(self.fake.locales)]

    def scalar(self) -> Any:
        f = self._locale()
        return self.rng.choice([f.pyint(-2**53, 2**53), f.pyfloat(), f.pybool(), None, f.word(), ""])

    def text(self) -> str:
        """A sentence in a random locale with emoji mixed in."""
        f = self._locale()
        return f"{f.sentence()} {self.emoji()}{self.emoji()}"

    def emoji(self) -> str:
        return self.fake["en_US"].emoji()

    def person(self) -> Dict[str, Any]:
        f = self._locale()
        return {"name": f.name(), "address": f.address(), "phone": f.phone_number(),
                "email": f.email(), "born": f.date_of_birth().isoformat(),
                "tags": [self.emoji() for _ in range(self.rng.randint(0, 3))]}

    def nested(self, depth: int = 4) -> Any:
        """Objects and lists nested up to ``depth`` levels with mixed leaves."""
        if depth == 0:
            return self.random_leaf()
        if self.rng.random() < 0.5:
            return {self._locale().word(): self.nested(depth - 1) for _ in range(self.rng.randint(1, 4))}
        return [self.nested(depth - 1) for _ in range(self.rng.randint(0, 4))]

    def list(self) -> List[Any]:
        return [self.random_leaf() for _ in range(self.rng.randint(0, 50))]

    def large(self, size: int = LARGE_MIN) -> str:
        """A string of at least ``size`` characters of mixed scripts."""
        parts: List[str] = []
        total = 0
        while total < size:
            part = self._locale().paragraph(nb_sentences=5)
            parts.append(part)
            total += len(part)
        return "\n".join(parts)

    def random_leaf(self) -> Any:
        return self.rng.choice([self.scalar, self.text])()

    def params(self, shape: Optional[str] = None) -> Any:
        """One params value of ``shape`` (one of ``shapes``), or of a random shape."""
        if shape is None:
            shape = self.rng.choice([s for s in self.shapes if s != "large"])
        try:
            return self.shapes[shape]()
        except KeyError:
            raise ValueError(f"unknown payload shape {shape!r}; choose one of {', '.join(self.shapes)}") from None

    def many(self, count: int, shape: Optional[str] = None) -> Iterator[Any]:
        """``count`` params values."""
        for _ in range(count):
            yield self.params(shape)
