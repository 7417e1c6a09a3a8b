"""``python -m loadtests run --scenario {overhead,ratelimit,payments,mixed} --users N
--duration 60s [--spawn-rate R] [--redis-url URL] [--out DIR] [--seed S]`` (see ``cli.py``)."""

from __future__ import annotations

import sys

from loadtests.cli import main

if __name__ == "__main__":
    sys.exit(main())
