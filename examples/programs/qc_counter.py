"""qc_counter: counts the messages that arrive on channel `input` and logs the totals.

    python qc_counter.py

The channel (a sub socket in the data-taking workflow) subscribes to everything. While
RUNNING it prints, once a second and flushed, a line

    qc: messages=123 bytes=4567 run=7

with the totals of the current run, and a final such line at STOP. The channel is opened
at CONFIGURE and closed with linger 0 at RESET or EXIT.
"""

from __future__ import annotations

import sys
import time

import zmq
from zmq_channels import open_socket

from corral.taskctl import Task, channels, run


class QcCounter(Task):
    def __init__(self) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self.inp: zmq.Socket[bytes] | None = None
        self.run_number = "?"
        self.messages = 0
        self.bytes = 0
        self.next_report = 0.0

    def configure(self, args: dict[str, str]) -> None:
        chans = channels(args)
        if "input" not in chans:
            raise ValueError("no channel 'input' in the CONFIGURE arguments")
        self.ctx = zmq.Context()
        try:
            self.inp = open_socket(self.ctx, chans["input"])
        except Exception:
            self.close()
            raise

    def start(self, args: dict[str, str]) -> None:
        self.run_number = args.get("run_number", "?")
        self.messages = self.bytes = 0
        self.next_report = time.monotonic() + 1.0

    def stop(self, args: dict[str, str]) -> None:
        self.report()

    def report(self) -> None:
        print(f"qc: messages={self.messages} bytes={self.bytes} run={self.run_number}", flush=True)

    def tick(self) -> None:
        assert self.inp is not None
        if self.inp.poll(20, zmq.POLLIN):
            until = time.monotonic() + 0.01
            while time.monotonic() < until:
                try:
                    frames = self.inp.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.messages += 1
                self.bytes += sum(len(f) for f in frames)
        now = time.monotonic()
        if now >= self.next_report:
            self.report()
            self.next_report = max(self.next_report + 1.0, now)

    def reset(self, args: dict[str, str]) -> None:
        self.close()

    def exit(self, args: dict[str, str]) -> None:
        self.close()

    def close(self) -> None:
        if self.inp is not None:
            self.inp.close(linger=0)
            self.inp = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None


if __name__ == "__main__":
    sys.exit(run(QcCounter()))
