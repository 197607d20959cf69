"""The events on Kafka, as AliECS publishes them: the store's events, in order, once each.

``corral serve --kafka HOST:PORT`` runs one ``KafkaPublisher``. The store stays the
source of truth: the publisher reads committed events from it (after the last one the
broker acknowledged), maps each to AliECS's messages (``aliecs_map``) and produces them
with librdkafka's idempotent producer; the bus only wakes it. docs/kafka.md has the
topics, the mapping and the guarantees.

How this runs. Everything happens on the server's event loop and nothing there blocks:
``produce`` only queues (librdkafka sends from its own threads), delivery reports are
served by ``poll(0)`` on a short timer while messages are in flight, store reads and
writes are the short SQLite calls the controller makes too. What can block — creating a
producer, asking the broker for topic metadata, reading the tail of each partition —
runs in a worker thread (``asyncio.to_thread``).

What is kept. ``kafka.acked_seq`` in the store's meta table: every event up to it was
acknowledged by the broker (all of its messages); it is written only after delivery
reports said so. ``kafka.instance``: this store's id, put in every message's headers
with the event's number. At most ``buffer`` messages are in memory at once (produced or
waiting to be); more are read from the store when there is room.

No loss, no duplicate. Every message of a partition carries (``corral-seq``,
``corral-part``); the idempotent producer keeps each partition's messages in order
without gaps or retried duplicates. Whenever a producer starts (at start-up, after a
broker outage that made messages fail, after a fatal producer error), the publisher
reads the last messages of each partition it writes to, and skips every message at or
below the newest of its own found there: those were stored by the broker, though their
acknowledgement never arrived. Everything after the acknowledged event is sent again
otherwise. Partitions are chosen here, not by librdkafka (``partition_for``: the hash
AliECS's Kafka writer uses), so that the publisher knows, before producing, which
partition's tail to compare a message with.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from corral.events.aliecs_map import AliecsMapper, Outgoing, StoreReader, topics
from corral.events.bus import EventBus

log = logging.getLogger("corral.kafka")
# librdkafka's own log lines: not shown (an unreachable broker is said once, by the
# publisher, from the error callback); to see them, attach a handler to this logger
rdlog = logging.getLogger("corral.kafka.librdkafka")
rdlog.addHandler(logging.NullHandler())
rdlog.propagate = False

ACKED_KEY = "kafka.acked_seq"
INSTANCE_KEY = "kafka.instance"
SEQ_HEADER = "corral-seq"
PART_HEADER = "corral-part"
INSTANCE_HEADER = "corral-instance"
KIND_HEADER = "corral-kind"
DEFAULT_PREFIX = "aliecs"
# librdkafka settings the publisher relies on; ``config`` may override the others
REQUIRED = {"enable.idempotence": True, "acks": "all"}
DEFAULTS: dict[str, Any] = {
    "linger.ms": 5,
    # a message not delivered by then fails, and the publisher starts a new producer and
    # sends it again (after an outage, or a broker that came back without its state)
    "message.timeout.ms": 30000,
    "socket.timeout.ms": 10000,
    "reconnect.backoff.max.ms": 2000,
}
# a message the broker will never take: logged, counted, skipped (not retried forever)
PERMANENT = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.TOPIC_EXCEPTION,
    }
)
# the settings an admin client and a consumer share with the producer
CLIENT_KEYS = ("bootstrap.", "security.", "sasl.", "ssl.", "client.", "socket.", "broker.")
Tails = dict[tuple[str, int], tuple[int, int]]  # (topic, partition) -> (seq, part)
STORE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)


class EventStore(StoreReader, Protocol):
    """What the publisher uses of the store (the SQLite store has these methods)."""

    def last_seq(self) -> int: ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...


def check_config(bootstrap: str, config: Mapping[str, Any]) -> str | None:
    """What is wrong with these producer settings (librdkafka's word), or None. It makes
    a producer and closes it at once: nothing is sent."""
    try:
        producer = Producer({**DEFAULTS, **dict(config), "bootstrap.servers": bootstrap,
                             **REQUIRED, "logger": rdlog})  # fmt: skip
    except (KafkaException, TypeError, ValueError) as e:
        what = e.args[0] if e.args else e
        return what.str() if isinstance(what, KafkaError) else str(what)
    _close_producer(producer)
    return None


def partition_for(key: bytes | None, partitions: int) -> int:
    """The partition of a key: FNV-1a (32 bit) of the key as a signed number, modulo the
    partitions, made positive — the hash AliECS's writer (kafka-go's ``Hash``, Sarama's
    too) uses. No key: partition 0."""
    if not key or partitions <= 1:
        return 0
    h = 0x811C9DC5
    for b in key:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    signed = h - (1 << 32) if h >= (1 << 31) else h
    return abs(signed) % partitions


def headers_of(msg: Message) -> dict[str, bytes]:
    """A consumed message's headers (the last of each name)."""
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return {k: v.encode() if isinstance(v, str) else v for k, v in pairs if v is not None}


@dataclass
class _Pending:
    """An event read from the store whose messages are not all acknowledged yet."""

    seq: int
    messages: list[Outgoing]
    left: int  # messages not acknowledged (or skipped) yet


class KafkaPublisher:
    def __init__(
        self,
        store: EventStore,
        bus: EventBus,
        bootstrap: str,
        *,
        topic_prefix: str = DEFAULT_PREFIX,
        config: Mapping[str, Any] | None = None,
        buffer: int = 20000,
        poll_interval: float = 0.02,
        tail_window: int = 64,
        connect_timeout: float = 10.0,
    ) -> None:
        """``bootstrap``: the brokers, ``HOST:PORT[,HOST:PORT...]``. ``config``: more
        librdkafka settings (security, timeouts); idempotence and ``acks=all`` stay on.
        ``buffer``: messages held in memory at most (one event's may be more)."""
        self.store = store
        self.bus = bus
        self.bootstrap = bootstrap
        self.prefix = topic_prefix
        self.config = {**DEFAULTS, **dict(config or {}), "bootstrap.servers": bootstrap}
        self.config.update(REQUIRED)
        self.buffer = max(1, buffer)
        self.poll_interval = poll_interval
        self.tail_window = max(1, tail_window)
        self.connect_timeout = connect_timeout
        self.mapper = AliecsMapper(store)
        self.acked = 0  # every event up to this one is acknowledged
        self._saved = 0  # the acked_seq in the store
        self._saved_at = 0.0
        self._next = 1  # the next event to read from the store
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._unsent: collections.deque[tuple[_Pending, int]] = collections.deque()
        self._in_memory = 0  # messages of the pending events
        self._producer: Producer | None = None
        self._gen = 0  # bumped with each new producer: reports of an older one are ignored
        self._partitions: dict[str, int] = {}
        self._tails: Tails = {}
        self._topics: list[str] = topics(self.prefix)
        self._rewind: str | None = None
        self._fails_in_row = 0
        self._instance = ""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._closing = False
        self._close_by = 0.0
        # what is said of it (status, metrics)
        self.state = "connecting"  # connecting, up, down
        self.last_error: str | None = None
        self.sent = 0  # messages acknowledged
        self.skipped = 0  # messages found already on the broker (not sent again)
        self.dropped = 0  # messages the broker refused for good
        self.errors = 0  # delivery and connection errors
        self.restarts = 0  # producers started anew (an outage, a fatal error)

    # -- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load where it was; follow the bus; start publishing (in the background)."""
        self._instance = self.store.get_meta(INSTANCE_KEY) or ""
        if not self._instance:
            self._instance = uuid.uuid4().hex
            self.store.set_meta(INSTANCE_KEY, self._instance)
        last = self.store.last_seq()
        saved = self.store.get_meta(ACKED_KEY)
        if saved is None:  # first start with Kafka: from now on (history stays in the store)
            self.acked = last
            self.store.set_meta(ACKED_KEY, str(last))
        else:
            self.acked = int(saved)
            if self.acked > last:
                log.warning(
                    "kafka: acknowledged event %d is past the store's last (%d); "
                    "publishing from %d", self.acked, last, last + 1,
                )  # fmt: skip
                self.acked = last
        self._saved = self.acked
        self._next = self.acked + 1
        self._unsubscribe = self.bus.subscribe(lambda _events: self._wake.set())
        self._task = asyncio.ensure_future(self._run())

    async def close(self, timeout: float = 10.0) -> None:
        """Publish what the store holds for up to ``timeout`` seconds, then stop; what was
        not acknowledged is published by the next start."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._closing = True
        self._close_by = time.monotonic() + timeout
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout + 5)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
            except Exception:
                log.exception("kafka: the publisher failed")
            self._task = None
        self._persist(force=True)
        await self._drop_producer()
        behind = self.store.last_seq() - self.acked
        if behind:
            log.warning("kafka: stopped %d events behind (sent at the next start)", behind)

    def status(self) -> dict[str, Any]:
        return {
            "broker": self.bootstrap,
            "state": self.state,
            "acked_seq": self.acked,
            "behind": max(0, self.store.last_seq() - self.acked),
            "in_memory": self._in_memory,
            "sent": self.sent,
            "skipped": self.skipped,
            "dropped": self.dropped,
            "errors": self.errors,
            "restarts": self.restarts,
            "last_error": self.last_error,
        }

    def collector(self) -> Collector:
        """Prometheus metrics of the publisher (``corral_kafka_*``)."""
        return _Collector(self)

    # -- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self._closing and (
                self._done() or self._producer is None or time.monotonic() >= self._close_by
            ):
                return  # (not connected: what is left waits in the store)
            try:
                if self._producer is None and not await self._connect():
                    continue
                self._fill()
                self._send()
                if self._producer is not None:
                    self._producer.poll(0)  # delivery reports and errors, now
                self._advance()
                if self._rewind is not None:
                    await self._restart()
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug here must not stop the server: try again later
                log.exception("kafka: publishing failed")
                self._error(f"{type(e).__name__}: {e}")
                await asyncio.sleep(1.0)
            busy = bool(self._pending) or self._closing
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval if busy else 1.0)
            self._wake.clear()

    def _done(self) -> bool:
        return not self._pending and self._next > self.store.last_seq()

    def _fill(self) -> None:
        """Read events after the last one read, while there is room in memory."""
        while self._in_memory < self.buffer or not self._pending:
            if self._next > self.store.last_seq():
                return
            room = max(1, min(1000, self.buffer - self._in_memory))
            try:
                batch = self.store.events(after=self._next - 1, limit=room)
            except STORE_ERRORS as e:
                self._error(f"reading the store: {e}")
                return
            if not batch:
                return
            for ev in batch:
                if self._in_memory >= self.buffer and self._pending:
                    return  # full: the rest of the batch is read again later
                seq = int(ev["seq"])
                try:
                    msgs = self.mapper.map(ev)
                except Exception:  # a bug in the mapping: say it, and go on
                    log.exception("kafka: event %d (%s) could not be mapped", seq, ev.get("kind"))
                    msgs = []
                p = _Pending(seq, msgs, len(msgs))
                self._pending[seq] = p
                self._in_memory += len(msgs)
                self._unsent.extend((p, i) for i in range(len(msgs)))
                self._next = seq + 1

    def _send(self) -> None:
        """Hand the waiting messages to librdkafka (it queues; it does not block)."""
        producer = self._producer
        while self._unsent and producer is not None and self._rewind is None:
            p, i = self._unsent[0]
            out = p.messages[i]
            topic = f"{self.prefix}.{out.topic}"
            n = self._partitions.get(topic)
            if n is None:  # a new integrated service: learn its topic first
                if topic not in self._topics:
                    self._topics.append(topic)
                self._rewind = f"new topic {topic}"
                return
            part = partition_for(out.key, n)
            if (p.seq, i) <= self._tails.get((topic, part), (0, -1)):
                self._unsent.popleft()  # on the broker already
                self.skipped += 1
                p.left -= 1
                continue
            headers: list[tuple[str, str | bytes | None]] = [
                (SEQ_HEADER, str(p.seq).encode()),
                (PART_HEADER, str(i).encode()),
                (INSTANCE_HEADER, self._instance.encode()),
                (KIND_HEADER, out.kind.encode()),
            ]
            try:
                producer.produce(
                    topic, value=out.value, key=out.key, partition=part, headers=headers,
                    on_delivery=partial(self._delivered, self._gen, p),
                )  # fmt: skip
            except BufferError:
                return  # librdkafka's queue is full: the next round
            except KafkaException as e:
                self._rewind = f"produce: {e}"
                return
            self._unsent.popleft()

    def _delivered(self, gen: int, p: _Pending, err: KafkaError | None, msg: Message) -> None:
        """A delivery report (from ``poll``, on the loop)."""
        if gen != self._gen:
            return  # of a producer that was replaced: its messages are sent again
        if err is None:
            p.left -= 1
            self.sent += 1
            self._fails_in_row = 0
            if self.state != "up":
                self._up()
            return
        self.errors += 1
        if err.code() in PERMANENT:
            p.left -= 1
            self.dropped += 1
            log.error("kafka: event %d refused by the broker for good, skipped: %s", p.seq, err)
            return
        if self._rewind is None:
            self._rewind = f"delivery failed: {err.str()}"

    def _advance(self) -> None:
        """Events whose messages are all acknowledged, in order, become acked."""
        while self._pending:
            seq, p = next(iter(self._pending.items()))
            if p.left > 0:
                break
            self._pending.popitem(last=False)
            self._in_memory -= len(p.messages)
            self.acked = seq
        self._persist()

    def _persist(self, *, force: bool = False) -> None:
        if self.acked == self._saved:
            return
        now = time.monotonic()
        if not force and self._pending and now - self._saved_at < 0.2:
            return  # at most 5 writes a second while busy
        try:
            self.store.set_meta(ACKED_KEY, str(self.acked))
        except STORE_ERRORS as e:  # kept in memory; written on the next round
            self._error(f"storing the acknowledged event: {e}")
            return
        self._saved, self._saved_at = self.acked, now

    # -- producers ------------------------------------------------------------------------

    async def _connect(self) -> bool:
        """A new producer, the partitions of the topics, the tails of the partitions."""
        gen = self._gen + 1
        try:
            producer, parts, tails = await asyncio.to_thread(self._connect_blocking, gen)
        except Exception as e:
            self._down(f"cannot reach the broker at {self.bootstrap}: {e}")
            await self._backoff()
            return False
        self._producer = producer
        self._partitions = parts
        self._tails = tails
        self._gen = gen
        self._up()
        return True

    def _connect_blocking(self, gen: int) -> tuple[Producer, dict[str, int], Tails]:
        conf = dict(self.config)
        conf["error_cb"] = partial(self._on_error, gen)
        conf["logger"] = rdlog
        producer = Producer(conf)
        try:
            # the cluster first: an unreachable broker is said after one timeout, not one
            # per topic
            producer.list_topics(timeout=self.connect_timeout)
            parts = {t: self._partitions_of(producer, t) for t in self._topics}
            tails = self._read_tails(parts)
        except BaseException:
            producer.close()
            raise
        return producer, parts, tails

    def _partitions_of(self, producer: Producer, topic: str) -> int:
        md = producer.list_topics(topic=topic, timeout=self.connect_timeout)
        t = md.topics.get(topic)
        if t is not None and t.error is None and t.partitions:
            return len(t.partitions)
        if (
            t is not None
            and t.error is not None
            and t.error.code()
            not in (
                KafkaError.UNKNOWN_TOPIC_OR_PART,
                KafkaError.LEADER_NOT_AVAILABLE,
            )
        ):
            raise KafkaException(t.error)
        admin = AdminClient(self._client_conf())
        for f in admin.create_topics([NewTopic(topic)]).values():
            try:
                f.result(self.connect_timeout)
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        md = producer.list_topics(topic=topic, timeout=self.connect_timeout)
        t = md.topics.get(topic)
        if t is None or t.error is not None or not t.partitions:
            raise KafkaException(t.error if t is not None else f"no topic {topic}")
        return len(t.partitions)

    def _client_conf(self) -> dict[str, Any]:
        """The settings of the producer an admin client or a consumer takes too."""
        out = {k: v for k, v in self.config.items() if k.startswith(CLIENT_KEYS)}
        out["logger"] = rdlog
        return out

    def _read_tails(self, parts: Mapping[str, int]) -> Tails:
        """The newest (seq, part) of this store on each partition, from its last messages."""
        conf = self._client_conf()
        conf.update({
            "group.id": f"corral-tail-{self._instance}",  # never joined: assign() only
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        })  # fmt: skip
        consumer = Consumer(conf)
        tails: Tails = {}
        try:
            assign = []
            for topic, n in parts.items():
                for part in range(n):
                    tp = TopicPartition(topic, part)
                    low, high = consumer.get_watermark_offsets(tp, timeout=self.connect_timeout)
                    if high > low:  # (the end is read up to the end of the partition)
                        assign.append(
                            TopicPartition(topic, part, max(low, high - self.tail_window))
                        )
            if not assign:
                return tails
            consumer.assign(assign)
            left = {(tp.topic, tp.partition) for tp in assign}
            deadline = time.monotonic() + self.connect_timeout * 3
            while left:
                if time.monotonic() > deadline:
                    raise KafkaException(f"reading the partitions' ends timed out: {sorted(left)}")
                m = consumer.poll(0.5)
                if m is None:
                    continue
                where = (m.topic() or "", m.partition() or 0)
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        left.discard(where)
                        continue
                    raise KafkaException(err)
                h = headers_of(m)
                if h.get(INSTANCE_HEADER) != self._instance.encode():
                    continue
                try:
                    mark = (int(h[SEQ_HEADER]), int(h[PART_HEADER]))
                except (KeyError, ValueError):
                    continue
                if mark > tails.get(where, (0, -1)):
                    tails[where] = mark
        finally:
            consumer.close()
        return tails

    async def _restart(self) -> None:
        """Deliveries failed: a new producer sends everything after the acked event again
        (minus what the partitions' tails show the broker has)."""
        why = self._rewind
        self._rewind = None
        self.restarts += 1
        self._fails_in_row += 1
        if why is not None and not why.startswith("new topic"):
            self._down(why)
        await self._drop_producer()
        self._unsent.clear()
        for p in self._pending.values():
            p.left = len(p.messages)
            self._unsent.extend((p, i) for i in range(len(p.messages)))
        if self._fails_in_row > 1:
            await self._backoff()

    async def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        self._gen += 1
        if producer is None:
            return
        with contextlib.suppress(Exception):
            producer.purge(in_queue=True, in_flight=True, blocking=False)
            producer.poll(0)  # the purged messages' reports (of an old generation: ignored)
        await asyncio.to_thread(_close_producer, producer)

    async def _backoff(self) -> None:
        delay = min(10.0, 0.25 * 2 ** min(self._fails_in_row, 6))
        self._fails_in_row += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing_soon(), delay)

    async def _closing_soon(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()

    # -- what is said -----------------------------------------------------------------------

    def _on_error(self, gen: int, err: KafkaError) -> None:
        """librdkafka's error callback (from ``poll``)."""
        if gen != self._gen:
            return
        self.errors += 1
        if err.fatal():  # the producer is done for: a new one
            self._rewind = f"fatal producer error: {err.str()}"
        elif err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._down(err.str())
        else:
            self.last_error = err.str()

    def _error(self, text: str) -> None:
        self.errors += 1
        self.last_error = text

    def _down(self, why: str) -> None:
        self.last_error = why
        if self.state != "down":
            self.state = "down"
            log.warning("kafka: the broker is unreachable (%s); events wait in the store", why)

    def _up(self) -> None:
        if self.state == "down":
            log.warning("kafka: the broker is back; publishing from event %d", self.acked + 1)
        self.state = "up"


def _close_producer(producer: Producer) -> None:
    with contextlib.suppress(Exception):
        producer.flush(0)
        producer.close()


class _Collector(Collector):
    def __init__(self, publisher: KafkaPublisher) -> None:
        self.p = publisher

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        p = self.p
        up = GaugeMetricFamily("corral_kafka_up", "1 while the Kafka broker takes events")
        up.add_metric([], 1.0 if p.state == "up" else 0.0)
        yield up
        acked = GaugeMetricFamily("corral_kafka_acked_seq", "The last event Kafka acknowledged")
        acked.add_metric([], float(p.acked))
        yield acked
        behind = GaugeMetricFamily(
            "corral_kafka_behind_events", "Stored events not yet acknowledged by Kafka"
        )
        try:
            behind.add_metric([], float(max(0, p.store.last_seq() - p.acked)))
        except STORE_ERRORS:
            behind.add_metric([], float("nan"))
        yield behind
        counters: Sequence[tuple[str, str, int]] = (
            ("corral_kafka_messages_sent", "Messages Kafka acknowledged", p.sent),
            ("corral_kafka_messages_skipped", "Messages found on Kafka already", p.skipped),
            ("corral_kafka_messages_dropped", "Messages Kafka refused for good", p.dropped),
            ("corral_kafka_errors", "Kafka delivery and connection errors", p.errors),
            ("corral_kafka_producer_restarts", "Kafka producers started anew", p.restarts),
        )
        for name, text, value in counters:
            c = CounterMetricFamily(name, text)
            c.add_metric([], float(value))
            yield c
