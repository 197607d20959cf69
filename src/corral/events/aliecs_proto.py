"""AliECS's event messages, declared in code: the wire format of its Kafka events.

AliECS (ALICE's control system) publishes ``events.Event`` protobuf messages on Kafka.
A consumer written for AliECS decodes corral's messages unchanged when they have the
same packages, message names, field names, numbers and types. Those are declared here,
as descriptors built with ``descriptor_pb2``, so no code generator (protoc) is needed
and no generated file has to be kept in step: the two files are named, and import each
other, as AliECS's are (``protos/common.proto``, package ``common``;
``protos/events.proto``, package ``events``), in a pool of their own (they cannot clash
with another program's ``events`` package). ``file_descriptor_set()`` gives both as a
``FileDescriptorSet``, the form tools such as ``pq`` take (``--msgtype events.Event``).

What is declared: every message and enum of the two files, with their fields, the
``Payload`` oneof of ``Event``, the ``vars`` map, the proto3 ``optional`` fields of
``User`` and the reserved numbers; not the options that only steer code generators.
The tests check this against AliECS's own ``.proto`` files when those are at hand.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import (  # type: ignore[import-untyped]
    descriptor_pb2,
    descriptor_pool,
    message_factory,
)

COMMON_FILE = "protos/common.proto"
EVENTS_FILE = "protos/events.proto"

_F = descriptor_pb2.FieldDescriptorProto
STRING, UINT32, INT32, INT64, BOOL = (
    _F.TYPE_STRING,
    _F.TYPE_UINT32,
    _F.TYPE_INT32,
    _F.TYPE_INT64,
    _F.TYPE_BOOL,
)
ENUM, MESSAGE = _F.TYPE_ENUM, _F.TYPE_MESSAGE

# a field: (name, number, type, type name for an enum or message field, or None)
Field = tuple[str, int, int, str | None]

OP_STATUS = ["NULL", "STARTED", "ONGOING", "DONE_OK", "DONE_ERROR", "DONE_TIMEOUT"]
BEAM_MODES = [
    "UNKNOWN", "SETUP", "ABORT", "INJECTION_PROBE_BEAM", "INJECTION_SETUP_BEAM",
    "INJECTION_PHYSICS_BEAM", "PREPARE_RAMP", "RAMP", "FLAT_TOP", "SQUEEZE", "ADJUST",
    "STABLE_BEAMS", "LOST_BEAMS", "UNSTABLE_BEAMS", "BEAM_DUMP_WARNING", "BEAM_DUMP",
    "RAMP_DOWN", "CYCLING", "RECOVERY", "INJECT_AND_DUMP", "CIRCULATE_AND_DUMP", "NO_BEAM",
]  # fmt: skip

# the message payloads of Event, by field number (the oneof ``Payload``)
PAYLOADS: list[Field] = [
    ("environmentEvent", 11, MESSAGE, ".events.Ev_EnvironmentEvent"),
    ("taskEvent", 12, MESSAGE, ".events.Ev_TaskEvent"),
    ("roleEvent", 13, MESSAGE, ".events.Ev_RoleEvent"),
    ("callEvent", 14, MESSAGE, ".events.Ev_CallEvent"),
    ("integratedServiceEvent", 15, MESSAGE, ".events.Ev_IntegratedServiceEvent"),
    ("runEvent", 16, MESSAGE, ".events.Ev_RunEvent"),
    ("frameworkEvent", 101, MESSAGE, ".events.Ev_MetaEvent_FrameworkEvent"),
    ("mesosHeartbeatEvent", 102, MESSAGE, ".events.Ev_MetaEvent_MesosHeartbeat"),
    ("coreStartEvent", 103, MESSAGE, ".events.Ev_MetaEvent_CoreStart"),
    ("beamModeEvent", 200, MESSAGE, ".events.Ev_BeamModeEvent"),
]

COMMON_MESSAGES: dict[str, list[Field]] = {
    "User": [("externalId", 1, INT32, None), ("id", 2, INT32, None), ("name", 3, STRING, None)],
    "WorkflowTemplateInfo": [
        ("name", 1, STRING, None),
        ("description", 2, STRING, None),
        ("path", 3, STRING, None),
        ("public", 4, BOOL, None),
    ],
    "BeamInfo": [
        ("stableBeamsStart", 1, INT64, None),
        ("stableBeamsEnd", 2, INT64, None),
        ("fillNumber", 3, INT32, None),
        ("fillingSchemeName", 4, STRING, None),
        ("beamType", 5, STRING, None),
        ("beamMode", 6, ENUM, ".common.BeamMode"),
    ],
}
OPTIONAL = {("User", "externalId"), ("User", "id")}  # proto3 ``optional``

EVENT_MESSAGES: dict[str, list[Field]] = {
    "Ev_MetaEvent_MesosHeartbeat": [],
    "Ev_MetaEvent_CoreStart": [("frameworkId", 1, STRING, None)],
    "Ev_MetaEvent_FrameworkEvent": [("frameworkId", 1, STRING, None), ("message", 2, STRING, None)],
    "Ev_EnvironmentEvent": [
        ("environmentId", 1, STRING, None),
        ("state", 2, STRING, None),
        ("runNumber", 3, UINT32, None),
        ("error", 4, STRING, None),
        ("message", 5, STRING, None),
        ("transition", 6, STRING, None),
        ("transitionStep", 7, STRING, None),
        ("transitionStatus", 8, ENUM, ".events.OpStatus"),
        ("vars", 9, MESSAGE, ".events.Ev_EnvironmentEvent.VarsEntry"),  # a map
        ("lastRequestUser", 10, MESSAGE, ".common.User"),
        ("workflowTemplateInfo", 11, MESSAGE, ".common.WorkflowTemplateInfo"),
    ],
    "Traits": [
        ("trigger", 1, STRING, None),
        ("await", 2, STRING, None),
        ("timeout", 3, STRING, None),
        ("critical", 4, BOOL, None),
    ],
    "Ev_TaskEvent": [
        ("name", 1, STRING, None),
        ("taskid", 2, STRING, None),
        ("state", 3, STRING, None),
        ("status", 4, STRING, None),
        ("hostname", 5, STRING, None),
        ("className", 6, STRING, None),
        ("traits", 7, MESSAGE, ".events.Traits"),
        ("environmentId", 8, STRING, None),
        ("path", 9, STRING, None),
    ],
    "Ev_CallEvent": [
        ("func", 1, STRING, None),
        ("callStatus", 2, ENUM, ".events.OpStatus"),
        ("return", 3, STRING, None),
        ("traits", 4, MESSAGE, ".events.Traits"),
        ("output", 5, STRING, None),
        ("error", 6, STRING, None),
        ("environmentId", 7, STRING, None),
        ("path", 8, STRING, None),
    ],
    "Ev_RoleEvent": [
        ("name", 1, STRING, None),
        ("status", 2, STRING, None),
        ("state", 3, STRING, None),
        ("rolePath", 4, STRING, None),
        ("environmentId", 5, STRING, None),
    ],
    "Ev_IntegratedServiceEvent": [
        ("name", 1, STRING, None),
        ("error", 2, STRING, None),
        ("operationName", 3, STRING, None),
        ("operationStatus", 4, ENUM, ".events.OpStatus"),
        ("operationStep", 5, STRING, None),
        ("operationStepStatus", 6, ENUM, ".events.OpStatus"),
        ("environmentId", 7, STRING, None),
        ("payload", 8, STRING, None),
    ],
    "Ev_RunEvent": [
        ("environmentId", 1, STRING, None),
        ("runNumber", 2, UINT32, None),
        ("state", 3, STRING, None),
        ("error", 4, STRING, None),
        ("transition", 5, STRING, None),
        ("transitionStatus", 6, ENUM, ".events.OpStatus"),
        ("lastRequestUser", 8, MESSAGE, ".common.User"),
    ],
    "Ev_BeamModeEvent": [
        ("timestamp", 1, INT64, None),
        ("beamInfo", 2, MESSAGE, ".common.BeamInfo"),
    ],
    "Event": [("timestamp", 1, INT64, None), ("timestampNano", 2, INT64, None), *PAYLOADS],
}
# reserved field numbers, as [start, end) ranges
RESERVED: dict[str, list[tuple[int, int]]] = {
    "Ev_RunEvent": [(7, 8)],
    "Event": [(3, 11), (17, 101), (104, 200)],
}


def _message(
    name: str, fields: list[Field], *, optional: set[str] | frozenset[str] = frozenset()
) -> Any:
    m = descriptor_pb2.DescriptorProto(name=name)
    for fname, number, ftype, type_name in fields:
        f = m.field.add(name=fname, number=number, type=ftype, label=_F.LABEL_OPTIONAL)
        f.json_name = fname
        if type_name is not None:
            f.type_name = type_name
        if fname in optional:  # proto3 ``optional``: a synthetic oneof of its own
            f.proto3_optional = True
            f.oneof_index = len(m.oneof_decl)
            m.oneof_decl.add(name=f"_{fname}")
    for start, end in RESERVED.get(name, []):
        m.reserved_range.add(start=start, end=end)
    return m


def _enum(name: str, values: list[str] | dict[str, int]) -> Any:
    e = descriptor_pb2.EnumDescriptorProto(name=name)
    pairs = values.items() if isinstance(values, dict) else ((v, i) for i, v in enumerate(values))
    for vname, number in pairs:
        e.value.add(name=vname, number=number)
    return e


def common_file() -> Any:
    """``protos/common.proto`` (package ``common``) as a FileDescriptorProto."""
    f = descriptor_pb2.FileDescriptorProto(name=COMMON_FILE, package="common", syntax="proto3")
    for name, fields in COMMON_MESSAGES.items():
        opt = {fname for m, fname in OPTIONAL if m == name}
        f.message_type.append(_message(name, fields, optional=opt))
    f.enum_type.append(_enum("SpecialUserId", {"INVALID": 0, "LHC": 60, "TIMER": 65}))
    f.enum_type.append(_enum("BeamMode", BEAM_MODES))
    return f


def events_file() -> Any:
    """``protos/events.proto`` (package ``events``) as a FileDescriptorProto."""
    f = descriptor_pb2.FileDescriptorProto(name=EVENTS_FILE, package="events", syntax="proto3")
    f.dependency.append(COMMON_FILE)
    f.public_dependency.append(0)  # ``import public``
    f.enum_type.append(_enum("OpStatus", OP_STATUS))
    for name, fields in EVENT_MESSAGES.items():
        m = _message(name, fields)
        if name == "Ev_EnvironmentEvent":  # map<string, string> vars = 9
            entry = m.nested_type.add(name="VarsEntry")
            entry.options.map_entry = True
            for fname, number in (("key", 1), ("value", 2)):
                ef = entry.field.add(name=fname, number=number, type=STRING)
                ef.label = _F.LABEL_OPTIONAL
                ef.json_name = fname
            next(x for x in m.field if x.name == "vars").label = _F.LABEL_REPEATED
        if name == "Event":
            m.oneof_decl.add(name="Payload")
            for x in m.field:
                if x.number > 10:
                    x.oneof_index = 0
        f.message_type.append(m)
    return f


def file_descriptor_set() -> Any:
    """Both files, as a FileDescriptorSet (``pq``'s FDSET, say)."""
    fds = descriptor_pb2.FileDescriptorSet()
    fds.file.append(common_file())
    fds.file.append(events_file())
    return fds


POOL = descriptor_pool.DescriptorPool()
POOL.Add(common_file())
POOL.Add(events_file())


def message_class(full_name: str) -> Any:
    """The class of a message of these files, by its full name (``events.Event``)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


Event = message_class("events.Event")
Ev_EnvironmentEvent = message_class("events.Ev_EnvironmentEvent")
Ev_TaskEvent = message_class("events.Ev_TaskEvent")
Ev_RoleEvent = message_class("events.Ev_RoleEvent")
Ev_CallEvent = message_class("events.Ev_CallEvent")
Ev_IntegratedServiceEvent = message_class("events.Ev_IntegratedServiceEvent")
Ev_RunEvent = message_class("events.Ev_RunEvent")
Traits = message_class("events.Traits")
User = message_class("common.User")
WorkflowTemplateInfo = message_class("common.WorkflowTemplateInfo")

# OpStatus values by name
NULL, STARTED, ONGOING, DONE_OK, DONE_ERROR, DONE_TIMEOUT = range(6)
