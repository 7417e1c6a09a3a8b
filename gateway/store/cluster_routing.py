"""ClusterRouter: each command to the primary serving its slot, auto-pipelined per primary.

Why not redis-py's ``RedisCluster.execute_command``: its generic path (a connection taken from
and returned to a per-node pool, a round trip of its own per command, metrics and retry
bookkeeping on every call) cost a cluster request several times the CPU of the same request
on one Redis. Here every primary gets one ``Pipeline`` (``pipeline.py``): the commands bound
for it in one event-loop turn leave in one write on its one connection. redis-py keeps the
topology only: the slot map (its ``NodesManager``), and each node's connection settings, from
which the pipeline's connection is made (AUTH, TLS, client name apply as before).

What the cluster answers besides a reply, and what is done about it (``send``):

* MOVED: the slot moved (resharding, failover); the map takes the new owner, the command goes
  there. ASK: the slot is being migrated and the key is on the target already; ``ASKING`` and
  the command go to the target side by side in one write. Both are capped at
  ``MAX_REDIRECTS`` per call.
* NOSCRIPT (a restarted or promoted node, ``SCRIPT FLUSH``): the script is loaded on that node,
  in the same write as the command sent once more.
* TRYAGAIN, CLUSTERDOWN, READONLY (a demoted master), a slot no one serves, a connection that
  failed before the command was written: nothing ran. After a short backoff the slot map is
  read again and the command resent, at most ``CLUSTER_RETRIES`` times.
* The connection broke after the command was written (``ReplyLost``): it may have run. It is
  resent (as above) only when the caller says running it twice is harmless; otherwise the
  error is raised, as on one Redis.

One ``store.timeout`` bounds the whole of a call, redirects and retries included: the caller's
(``CallGuard``). Reading the slot map is shared by every call that needs it at once, and a
primary that leaves the map has its pipeline closed once its last replies are due.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, NodesManager, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.cluster import PRIMARY
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.store.pipeline import Joint, Pipeline, ReplyLost
from gateway.store.resp import command

__all__ = ["CLUSTER_RETRIES", "MAX_REDIRECTS", "RETRY_BACKOFF_S", "ClusterRouter"]

#: Times one call reads the slot map again and resends after a failure where nothing ran
#: (TRYAGAIN, CLUSTERDOWN, READONLY, a refused connection) or, for a command safe to run
#: twice, after a lost reply.
CLUSTER_RETRIES = 2
#: MOVED and ASK redirects one call follows (redis-py's cap, too).
MAX_REDIRECTS = 16
#: The pause before the n-th retry is n times this: a failover or a migration step needs a
#: moment, and the call's deadline is short.
RETRY_BACKOFF_S = 0.025
#: A slot map read this recently is taken as current: calls failing together read it once.
REFRESH_INTERVAL_S = 0.05

_ASKING = command("ASKING")
_NOT_RUN = (TryAgainError, ClusterDownError, ReadOnlyError, SlotNotCoveredError, RedisConnectionError)


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class ClusterRouter:
    """Commands routed by slot over one pipeline per primary.

    Args:
        client: the redis-py cluster client whose slot map is used (initialized by ``open``).
        timeout_s: ``store.timeout``: bounds each pipelined reply, and each slot map read.
    """

    def __init__(self, client: RedisCluster, *, timeout_s: float) -> None:
        self._client = client
        self._nodes: NodesManager = client.nodes_manager
        self._timeout_s = timeout_s
        self._pipelines: dict[str, Pipeline] = {}  # primary's name (host:port) -> its pipeline
        # slot -> its primary's pipeline, for the slot map ``_by_slot_map`` (bounded: 16384 slots)
        self._by_slot: dict[int, Pipeline] = {}
        self._by_slot_map: object = None
        self._retired: dict[Pipeline, asyncio.TimerHandle] = {}  # left the map, closed soon
        self._closing: set[asyncio.Task[None]] = set()
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = -REFRESH_INTERVAL_S

    async def open(self) -> None:
        """Read the topology (from whichever node the URL names)."""
        await self._client.initialize()
        self._refreshed_at = asyncio.get_running_loop().time()

    def primaries(self) -> list[ClusterNode]:
        return self._nodes.get_nodes_by_server_type(PRIMARY)

    @property
    def piped_nodes(self) -> frozenset[str]:
        """The nodes (``host:port``) that have a pipeline now, for diagnostics and tests."""
        return frozenset(self._pipelines)

    def pipeline(self, node: ClusterNode) -> Pipeline:
        """The pipeline to ``node``, made on first use."""
        pipeline = self._pipelines.get(node.name)
        if pipeline is None:
            pipeline = self._pipelines[node.name] = Pipeline(
                lambda: _connection_to(node), timeout_s=self._timeout_s)
        return pipeline

    def slot_pipeline(self, slot: int) -> Pipeline:
        """The pipeline to the primary serving ``slot`` (``SlotNotCoveredError`` when none is
        known), remembered until the slot map changes: a new map read, a MOVED followed."""
        map_now = self._nodes.slots_cache
        if map_now is not self._by_slot_map:
            self._by_slot.clear()
            self._by_slot_map = map_now
        pipeline = self._by_slot.get(slot)
        if pipeline is None:
            pipeline = self._by_slot[slot] = self.pipeline(self._primary(slot))
        return pipeline

    def submit_all(self, sends: Sequence[tuple[int, bytes]]) -> asyncio.Future[list[Any]] | None:
        """Each ``(slot, packed)`` sent to its slot's primary now (with this turn's other
        commands); one future for all their replies, each the reply or the exception its
        command met, which the caller hands to ``follow``. None, with nothing sent, when a
        slot has no primary known or a pipeline no live connection (``send`` then does each)."""
        try:
            conns = [self.slot_pipeline(slot).live() for slot, _ in sends]
        except SlotNotCoveredError:
            return None
        if None in conns:
            return None
        joint = Joint(len(sends))
        for i, conn in enumerate(conns):
            conn.send_part(sends[i][1], joint.part(i))  # type: ignore[union-attr]  # none is None
        return joint.future

    async def send(
        self, slot: int, packed: bytes, load: bytes | None = None, resend_safe: bool = False
    ) -> Any:
        """``packed`` (one framed command) on the primary serving ``slot``; its reply, or the
        exception for an error reply or a connection error, all within ``store.timeout``.

        ``load``: the ``SCRIPT LOAD`` to send before a resend after NOSCRIPT. ``resend_safe``:
        the command may be resent after its reply was lost (it may have run).

        The first attempt is bounded by its pipeline's write timer; only when it fails (a
        redirect, NOSCRIPT, a failover) do the attempts that follow run under a deadline of
        their own, what is left of ``store.timeout`` since this call began."""
        began = asyncio.get_running_loop().time()
        try:
            return await self.slot_pipeline(slot).call(packed)
        except Exception as exc:  # followed when it can be; raised again there otherwise
            return await self.follow(slot, packed, load, resend_safe, exc, began=began)

    async def follow(
        self, slot: int, packed: bytes, load: bytes | None, resend_safe: bool, failure: BaseException, *,
        began: float,
    ) -> Any:
        """After a first attempt (sent at loop time ``began``) failed with ``failure``:
        redirects followed, the script loaded, the slot map read again, all within what is left
        of ``store.timeout``; the reply, or the failure (or a later one) raised."""
        async with asyncio.timeout_at(began + self._timeout_s):
            return await self._followed(slot, packed, load, resend_safe, failure)

    async def _followed(
        self, slot: int, packed: bytes, load: bytes | None, resend_safe: bool, failure: BaseException
    ) -> Any:
        pending: BaseException | None = failure
        redirects = retries = 0
        asked: ClusterNode | None = None  # the node an ASK named, for the next attempt only
        loading = False
        while True:
            node: ClusterNode | None = asked
            try:
                if pending is not None:
                    raised, pending = pending, None
                    raise raised
                if node is None:
                    node = self._primary(slot)
                    if not loading:
                        return await self.pipeline(node).call(packed)
                heads = ([load] if loading and load else []) + ([_ASKING] if asked else [])
                replies = await self.pipeline(node).call_adjacent(*heads, packed)
                if isinstance(replies[-1], BaseException):
                    raise replies[-1]
                return replies[-1]
            except MovedError as exc:
                redirects = _counted(redirects, MAX_REDIRECTS, exc)
                await self._nodes.move_slot(exc)
                self._by_slot.clear()  # the map changed in place
                self._prune()
                asked = None
            except AskError as exc:
                redirects = _counted(redirects, MAX_REDIRECTS, exc)
                asked = await self._node_at(exc.host, exc.port)
            except NoScriptError:
                if loading or load is None:
                    raise
                loading = True
            except ReplyLost as exc:
                if not resend_safe:
                    raise
                retries = await self._recover(retries, node, exc)
                asked = None
            except _NOT_RUN as exc:
                retries = await self._recover(retries, node, exc)
                asked = None

    def _primary(self, slot: int) -> ClusterNode:
        try:
            return self._nodes.get_node_from_slot(slot)
        except KeyError:  # no map yet: the topology was never read (open failed)
            msg = f"slot {slot} is not in the slot map (not read yet)"
            raise SlotNotCoveredError(msg) from None

    async def _node_at(self, host: str, port: int) -> ClusterNode:
        node = self._nodes.get_node(host=host, port=port)
        if node is None:  # a node the map does not know yet
            await self.refresh()
            node = self._nodes.get_node(host=host, port=port)
        if node is None:
            msg = f"redirected to {host}:{port}, a node the cluster does not list"
            raise ClusterError(msg)
        return node

    async def _recover(self, retries: int, node: ClusterNode | None, exc: BaseException) -> int:
        """Wait a little and read the slot map again; the new retry count, or ``exc`` raised
        past the bound."""
        if retries >= CLUSTER_RETRIES:
            raise exc
        retries += 1
        if node is not None:  # asked last when the map is read
            self._nodes.move_node_to_end_of_cached_nodes(node.name)
        await asyncio.sleep(RETRY_BACKOFF_S * retries)
        await self.refresh()
        return retries

    async def refresh(self) -> None:
        """Read the slot map again; calls that need it at once share one read, and one read
        within ``REFRESH_INTERVAL_S`` is taken as current. The read goes on if its callers
        give up (a caller's deadline does not cut it), bounded by two ``store.timeout``."""
        loop = asyncio.get_running_loop()
        task = self._refreshing
        if task is None:
            if loop.time() - self._refreshed_at < REFRESH_INTERVAL_S:
                return
            task = self._refreshing = loop.create_task(self._refresh())
            task.add_done_callback(_retrieve)
        await asyncio.shield(task)

    async def _refresh(self) -> None:
        try:
            async with asyncio.timeout(2 * self._timeout_s):  # room to ask a second node
                if self._nodes.slots_cache:
                    await self._nodes.initialize()
                else:  # never read (open failed): as open does, so close closes it all
                    await self._client.initialize()
            self._prune()
        finally:
            self._refreshing = None
            self._refreshed_at = asyncio.get_running_loop().time()

    def _prune(self) -> None:
        """Retire the pipelines of nodes that serve no slot now: closed once their callers'
        replies are due (one ``store.timeout``), so at most one pipeline per known primary
        stays."""
        primaries = {n.name for n in self.primaries()}
        loop = asyncio.get_running_loop()
        self._by_slot.clear()
        for name in [n for n in self._pipelines if n not in primaries]:
            pipeline = self._pipelines.pop(name)
            self._retired[pipeline] = loop.call_later(self._timeout_s, self._close_retired, pipeline)

    def _close_retired(self, pipeline: Pipeline) -> None:
        if self._retired.pop(pipeline, None) is not None:
            task = asyncio.get_running_loop().create_task(pipeline.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every pipeline, then the redis-py client (its topology connections)."""
        pipelines = [*self._pipelines.values(), *self._retired]
        for handle in self._retired.values():
            handle.cancel()
        self._pipelines.clear()
        self._retired.clear()
        for pipeline in pipelines:
            await pipeline.close()
        if self._refreshing is not None:
            self._refreshing.cancel()
        await self._client.aclose()


def _counted(count: int, bound: int, exc: BaseException) -> int:
    if count >= bound:
        raise exc
    return count + 1


def _connection_to(node: ClusterNode) -> AbstractConnection:
    """A redis-py connection to ``node`` with its settings; no retries of its own (the router
    decides what is resent)."""
    options = {**node.connection_kwargs, "retry": Retry(NoBackoff(), retries=0)}
    return node.connection_class(**options)
