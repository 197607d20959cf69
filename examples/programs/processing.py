"""processing: "processes" time frames from channel `input` and reports on channel `qc`.

    python processing.py --pipeline=N

Each message pulled from `input` is processed: its bytes are counted and checksummed
(Adler-32). When the controller gives a channel `qc`, a JSON summary of every message is
published on it (pipeline, run, detector, sequence, bytes, checksum). Channels are opened
at CONFIGURE and closed with linger 0 at RESET or EXIT; data moves only while RUNNING.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib

import zmq
from zmq_channels import open_socket

from corral.taskctl import Task, channels, run


class Processing(Task):
    def __init__(self, pipeline: int) -> None:
        self.pipeline = pipeline
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self.inp: zmq.Socket[bytes] | None = None
        self.qc: zmq.Socket[bytes] | None = None
        self.run_number = "?"
        self.processed = 0
        self.bytes = 0
        self.dropped = 0  # summaries the qc channel could not take

    def configure(self, args: dict[str, str]) -> None:
        chans = channels(args)
        if "input" not in chans:
            raise ValueError("no channel 'input' in the CONFIGURE arguments")
        self.ctx = zmq.Context()
        try:
            self.inp = open_socket(self.ctx, chans["input"])
            if "qc" in chans:
                self.qc = open_socket(self.ctx, chans["qc"])
        except Exception:
            self.close()
            raise
        print(f"processing {self.pipeline}: {sorted(chans)}", flush=True)

    def start(self, args: dict[str, str]) -> None:
        self.run_number = args.get("run_number", "?")
        self.processed = self.bytes = self.dropped = 0

    def stop(self, args: dict[str, str]) -> None:
        print(
            f"processing {self.pipeline}: run {self.run_number} processed={self.processed} "
            f"bytes={self.bytes} qc_dropped={self.dropped}",
            flush=True,
        )

    def tick(self) -> None:
        assert self.inp is not None
        if not self.inp.poll(20, zmq.POLLIN):
            return
        until = time.monotonic() + 0.01
        while time.monotonic() < until:
            try:
                frames = self.inp.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.process(frames)

    def process(self, frames: list[bytes]) -> None:
        try:
            header = json.loads(frames[0])
        except ValueError:
            header = {}
        size = sum(len(f) for f in frames)
        checksum = 1
        for f in frames[1:]:
            checksum = zlib.adler32(f, checksum)
        self.processed += 1
        self.bytes += size
        if self.qc is None:
            return
        summary = {
            "pipeline": self.pipeline,
            "run": self.run_number,
            "detector": header.get("detector") if isinstance(header, dict) else None,
            "sequence": header.get("sequence") if isinstance(header, dict) else None,
            "bytes": size,
            "checksum": checksum,
        }
        try:
            self.qc.send(json.dumps(summary).encode(), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def reset(self, args: dict[str, str]) -> None:
        self.close()

    def exit(self, args: dict[str, str]) -> None:
        self.close()

    def close(self) -> None:
        for sock in (self.inp, self.qc):
            if sock is not None:
                sock.close(linger=0)
        self.inp = self.qc = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", type=int, default=1, help="this pipeline's number")
    a = p.parse_args()
    return run(Processing(a.pipeline))


if __name__ == "__main__":
    sys.exit(main())
