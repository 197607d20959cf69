"""A FairMQ device for tests (control mode ``fairmq``), on ``corral.taskctl.Device``.

It opens a ZeroMQ socket per channel (binding at BIND, connecting at CONNECT) and
closes them at RESET DEVICE. Each FairMQ transition it carries out is appended, as a
JSON line ``{"step": ..., "args": ...}``, to ``--record PATH.<task path>``. Switches,
each naming a FairMQ transition (``BIND``, ``RESET TASK``, ...):

  --fail STEP   raise in that step (``OSError: address in use``): the device goes to ERROR
  --exit STEP   exit with status 3 in that step, before answering
  --hang STEP   never answer that step (and die at once on SIGTERM)

Started with ``sys.executable`` by the tests' task classes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

import zmq

from corral.taskctl import Device, channels, run_device


class SampleDevice(Device):
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.ctx = zmq.Context()
        self.sockets: dict[str, zmq.Socket[Any]] = {}

    def _at(self, step: str, args: dict[str, str] | None = None) -> None:
        if self.opts.record:
            path = f"{self.opts.record}.{os.environ.get('CORRAL_TASK_PATH', '')}"
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "args": args}) + "\n")
        if step == self.opts.fail:
            raise OSError(f"address in use (at {step})")
        if step == self.opts.exit:
            sys.stdout.flush()
            os._exit(3)
        if step == self.opts.hang:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            threading.Event().wait()

    def _open(self, method: str) -> None:
        for ch in channels(self.properties).values():
            if ch.method != method:
                continue
            kind = {"push": zmq.PUSH, "pull": zmq.PULL, "pub": zmq.PUB, "sub": zmq.SUB}[ch.type]
            sock = self.ctx.socket(kind)
            sock.setsockopt(zmq.LINGER, 0)
            if method == "bind":
                sock.bind(ch.address)
            else:
                sock.connect(ch.address)
            self.sockets[ch.name] = sock

    def init_device(self, props: dict[str, str]) -> None:
        self._at("INIT DEVICE", props)

    def complete_init(self) -> None:
        self._at("COMPLETE INIT")

    def bind(self) -> None:
        self._at("BIND")
        self._open("bind")

    def connect(self) -> None:
        self._at("CONNECT")
        self._open("connect")

    def init_task(self) -> None:
        self._at("INIT TASK")

    def run(self, args: dict[str, str]) -> None:
        self._at("RUN", args)

    def stop(self) -> None:
        self._at("STOP")

    def reset_task(self) -> None:
        self._at("RESET TASK")

    def reset_device(self) -> None:
        self._at("RESET DEVICE")
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()

    def end(self) -> None:
        self._at("END")
        self.ctx.term()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", default="")
    parser.add_argument("--fail", default="")
    parser.add_argument("--exit", default="")
    parser.add_argument("--hang", default="")
    return run_device(SampleDevice(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
