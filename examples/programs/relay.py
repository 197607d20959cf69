"""relay: forwards every message from one channel to another, as it is.

    python relay.py --input=NAME --output=NAME

Used for stfbuilder (readout → output), stfsender (input → the distributor) and the
tf-distributor (many senders push to its input, many processors pull from its output).
Both channels are opened at CONFIGURE as the controller says (bind or connect, type) and
closed with linger 0 at RESET or EXIT. Messages move only while RUNNING; a message the
output cannot take yet is held (backpressure), never waited for more than 20 ms.
"""

from __future__ import annotations

import argparse
import sys
import time

import zmq
from zmq_channels import open_socket

from corral.taskctl import Task, channels, run


class Relay(Task):
    def __init__(self, input_name: str, output_name: str) -> None:
        self.names = (input_name, output_name)
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self.inp: zmq.Socket[bytes] | None = None
        self.out: zmq.Socket[bytes] | None = None
        self.pending: list[bytes] | None = None
        self.forwarded = 0
        self.run_number = "?"

    def configure(self, args: dict[str, str]) -> None:
        chans = channels(args)
        for name in self.names:
            if name not in chans:
                raise ValueError(f"no channel {name!r} in the CONFIGURE arguments")
        self.ctx = zmq.Context()
        try:
            self.inp = open_socket(self.ctx, chans[self.names[0]])
            self.out = open_socket(self.ctx, chans[self.names[1]])
        except Exception:
            self.close()
            raise
        i, o = chans[self.names[0]], chans[self.names[1]]
        print(f"relay: {i.type} {i.address} -> {o.type} {o.address}", flush=True)

    def start(self, args: dict[str, str]) -> None:
        self.run_number = args.get("run_number", "?")
        self.forwarded = 0

    def stop(self, args: dict[str, str]) -> None:
        print(f"relay: run {self.run_number} forwarded={self.forwarded}", flush=True)

    def tick(self) -> None:
        assert self.inp is not None
        if self.pending is not None and not self.flush(wait_ms=20):
            return
        if not self.inp.poll(20, zmq.POLLIN):
            return
        until = time.monotonic() + 0.01
        while time.monotonic() < until:
            try:
                self.pending = self.inp.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not self.flush(wait_ms=0):
                return

    def flush(self, wait_ms: int) -> bool:
        """Send the held message; False if the output cannot take it yet."""
        assert self.out is not None and self.pending is not None
        try:
            self.out.send_multipart(self.pending, zmq.NOBLOCK)
        except zmq.Again:
            if wait_ms:
                self.out.poll(wait_ms, zmq.POLLOUT)
            return False
        self.pending = None
        self.forwarded += 1
        return True

    def reset(self, args: dict[str, str]) -> None:
        self.close()

    def exit(self, args: dict[str, str]) -> None:
        self.close()

    def close(self) -> None:
        for sock in (self.inp, self.out):
            if sock is not None:
                sock.close(linger=0)
        self.inp = self.out = self.pending = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="the channel to receive from")
    p.add_argument("--output", required=True, help="the channel to send to")
    a = p.parse_args()
    return run(Relay(a.input, a.output))


if __name__ == "__main__":
    sys.exit(main())
