"""The ZeroMQ side of a corral channel, shared by the example programs.

A channel arrives in the CONFIGURE arguments (``chans.NAME.*``, see docs/protocol.md):
its address, whether to bind or connect, and its ZeroMQ socket type. ``open_socket``
makes the socket it describes, with linger 0 so that closing never blocks.
"""

from __future__ import annotations

import zmq

from corral.taskctl import Channel

TYPES = {"push": zmq.PUSH, "pull": zmq.PULL, "pub": zmq.PUB, "sub": zmq.SUB}


def open_socket(ctx: zmq.Context[zmq.Socket[bytes]], chan: Channel) -> zmq.Socket[bytes]:
    if chan.transport != "zeromq" or chan.type not in TYPES:
        raise ValueError(f"channel {chan.name}: {chan.transport} {chan.type} is not supported")
    sock = ctx.socket(TYPES[chan.type])
    sock.linger = 0
    if chan.type == "sub":
        sock.subscribe(b"")
    try:
        if chan.method == "bind":
            sock.bind(chan.address)
        else:
            sock.connect(chan.address)
    except zmq.ZMQError:
        sock.close()  # (a socket left open would hang the context's term() forever)
        raise
    return sock
