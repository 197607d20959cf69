"""readout: reads out a (simulated) detector, emitting frames on channel `readout`.

    python readout.py --rate=N --detector=NAME [--frames=K]

While RUNNING it sends about N messages a second, each two frames: a small JSON header
(detector, run_number, sequence) and 1 KiB of payload. With --frames=K it sends
END_OF_STREAM after K frames of a run and produces nothing more in that run.
The channel is opened at CONFIGURE as the controller says (bind or connect, type) and
closed with linger 0 at RESET or EXIT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import zmq
from zmq_channels import open_socket

from corral.taskctl import Task, channels, run

PAYLOAD = bytes(range(256)) * 4


class Readout(Task):
    def __init__(self, rate: float, detector: str, frames: int | None) -> None:
        self.period = 1.0 / max(rate, 0.001)
        self.detector = detector
        self.frames = frames
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self.sock: zmq.Socket[bytes] | None = None
        self.run_number = 0
        self.sent = 0
        self.next_at = 0.0

    def configure(self, args: dict[str, str]) -> None:
        chans = channels(args)
        if "readout" not in chans:
            raise ValueError("no channel 'readout' in the CONFIGURE arguments")
        self.ctx = zmq.Context()
        try:
            self.sock = open_socket(self.ctx, chans["readout"])
        except Exception:
            self.close()
            raise
        c = chans["readout"]
        print(f"readout {self.detector}: {c.method} {c.type} {c.address}", flush=True)

    def start(self, args: dict[str, str]) -> None:
        self.run_number = int(args.get("run_number", "0"))
        self.sent = 0
        self.next_at = time.monotonic()

    def stop(self, args: dict[str, str]) -> None:
        print(f"readout {self.detector}: run {self.run_number} sent={self.sent}", flush=True)

    def tick(self) -> None:
        assert self.sock is not None
        if self.frames is not None and self.sent >= self.frames:
            time.sleep(0.02)  # done for this run: nothing to do
            return
        now = time.monotonic()
        if now < self.next_at:
            time.sleep(min(self.next_at - now, 0.02))
            return
        header = {"detector": self.detector, "run_number": self.run_number, "sequence": self.sent}
        try:
            self.sock.send_multipart([json.dumps(header).encode(), PAYLOAD], zmq.NOBLOCK)
        except zmq.Again:  # nobody to take it yet: wait a little, try again
            self.sock.poll(20, zmq.POLLOUT)
            return
        self.sent += 1
        self.next_at = max(self.next_at + self.period, now - 0.1)  # catch up 0.1 s at most
        if self.frames is not None and self.sent >= self.frames:
            self.end_of_stream()

    def reset(self, args: dict[str, str]) -> None:
        self.close()

    def exit(self, args: dict[str, str]) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, required=True, help="messages per second")
    p.add_argument("--detector", required=True)
    p.add_argument("--frames", type=int, default=None, help="END_OF_STREAM after K frames")
    a = p.parse_args()
    return run(Readout(a.rate, a.detector, a.frames))


if __name__ == "__main__":
    sys.exit(main())
