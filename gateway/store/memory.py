"""``memory://``: the embedded store, for one process (the demo, tests, a single worker).

It runs the very same Lua scripts as Redis, on fakeredis's in-process Lua 5.1 runtime: there
is no second implementation of any decision to drift apart. Its state lives in this process
only, so two processes (or ``--workers 2``) each get their own limits: use Redis for those.
"""

from __future__ import annotations

from typing import Any

import fakeredis
from fakeredis import aioredis

from gateway.store.redis import RedisStore

__all__ = ["memory_store"]


def memory_store(**options: Any) -> RedisStore:
    """A store on a private in-process fakeredis server; ``options`` as for ``RedisStore``."""
    server = fakeredis.FakeServer(version=(7,))
    client = aioredis.FakeRedis(server=server)
    return RedisStore(client, **options)
