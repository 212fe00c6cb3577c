"""Made-up but valid identities for the demo, the benchmarks and the tests."""
from __future__ import annotations

import datetime as dt
import random


def personnummer(born: dt.date, serial: int) -> str:
    """`YYYYMMDD` + three-digit serial (001-999; 000 is never issued) + the Luhn check digit over the last ten."""
    if not 1 <= serial <= 999:
        raise ValueError("a personnummer serial is 001-999")
    digits = f"{born:%Y%m%d}{serial:03d}"
    total = 0
    for i, d in enumerate(digits[2:]):
        n = int(d) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return digits + str((10 - total % 10) % 10)


def random_personnummer(rng: random.Random | None = None) -> str:
    rng = rng or random.Random()
    return personnummer(dt.date(1930, 1, 1) + dt.timedelta(days=rng.randrange(80 * 365)), rng.randrange(1, 1000))
