"""The site: what a farm gives every template (AliECS's site-wide defaults, its inventory,
its DPL commands), made into the ``templates.services.Site`` an expansion reads.

- **Site defaults**: a YAML file of ``name: value`` (``--defaults FILE``; for
  ``corral serve`` also ``site-defaults.yaml`` in the data directory). They sit under
  every template's own defaults: a template or a caller overrides them.
- **Inventory**: the nodes' labels (``detector``, ``cards``) for ``inventory.*``.
- **DPL commands**: ``dpl.Generate*`` runs a DPL command with ``--dump-workflow`` in
  bash, in the workflow repository, with a minimal environment; the command reads a
  caller's values from ``CORRAL_VALUE_n`` (never parsed), it may run ``DPL_TIMEOUT``
  seconds and print ``MAX_DUMP`` bytes; a description is kept per command, so the same
  command runs once per process.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import yaml

from corral.model.inventory import Node
from corral.ports.taskenv import task_environment
from corral.store.sqlite import ConfigReader
from corral.templates import configpayload
from corral.templates.configpayload import ConfigError
from corral.templates.dpl import MAX_DUMP
from corral.templates.services import ServiceError, Site

DPL_TIMEOUT = 120.0
MAX_DEFAULTS_FILE = 4 * 1024 * 1024
SITE_DEFAULTS_FILE = "site-defaults.yaml"  # in a data directory, read by corral serve


class SiteError(ValueError):
    """A broken site file; the message says which file and line."""


def load_defaults(path: str) -> dict[str, str]:
    """A site-defaults file: a mapping of variable names to scalar values."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DEFAULTS_FILE + 1)
    except OSError as e:
        raise SiteError(f"{path}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_DEFAULTS_FILE:
        raise SiteError(f"{path}: larger than {MAX_DEFAULTS_FILE} bytes")
    try:
        node = yaml.compose(raw.decode("utf-8"), Loader=yaml.SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SiteError(f"{path}: not YAML: {e}") from None
    except RecursionError:
        raise SiteError(f"{path}: nests too deep for a file of name: value") from None
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise SiteError(f"{path}:{node.start_mark.line + 1}: expected a mapping of name: value")
    out: dict[str, str] = {}
    for k, v in node.value:
        line = k.start_mark.line + 1
        if not isinstance(k, yaml.ScalarNode) or not k.value.isidentifier():
            raise SiteError(f"{path}:{line}: a variable name is a word of letters, digits, _")
        if not isinstance(v, yaml.ScalarNode):
            raise SiteError(f"{path}:{line}: {k.value}: the value must be a scalar")
        if k.value in out:
            raise SiteError(f"{path}:{line}: {k.value} is given twice")
        out[k.value] = "" if v.tag.endswith(":null") and v.value in ("", "~", "null") else v.value
    return out


def repository_of(workflow_path: str) -> str:
    """The workflow repository a workflow file is in: the parent of its ``workflows/``
    folder (as in AliECS's ControlWorkflows), else its own folder."""
    here = os.path.dirname(os.path.abspath(workflow_path))
    return os.path.dirname(here) if os.path.basename(here) == "workflows" else here


def jit_reader(repo: str) -> Callable[[str], str | None]:
    """Reads ``jit/NAME`` of a workflow repository (NAME is checked by the caller)."""

    def read(name: str) -> str | None:
        path = os.path.join(repo, "jit", name)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_DUMP + 1)  # a JSON description, or a command
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ServiceError(f"jit/{name}: cannot read: {e.strerror}") from None
        return data.decode("utf-8", "replace")

    return read


class DplRunner:
    """Runs DPL commands for their JSON description, one at a time per command."""

    def __init__(
        self,
        cwd: str,
        *,
        timeout: float = DPL_TIMEOUT,
        passed: Mapping[str, str] | None = None,
    ) -> None:
        self.cwd = cwd
        self.timeout = timeout
        self.passed = dict(passed or {})
        self._cache: dict[tuple[str, tuple[tuple[str, str], ...]], str] = {}
        self._lock = threading.Lock()
        self.runs = 0

    def __call__(self, script: str, env: Mapping[str, str]) -> str:
        key = (script, tuple(sorted(env.items())))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            out = self._run(script, env)
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = out
            return out

    def _run(self, script: str, env: Mapping[str, str]) -> str:
        self.runs += 1
        child_env = task_environment(corral=sorted(env.items()), passed=self.passed)
        try:
            p = subprocess.Popen(
                ["bash", "-c", script],
                cwd=self.cwd,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            raise ServiceError(f"cannot run the DPL command: {e.strerror}") from None
        try:
            out, err, why = _bounded_output(p, self.timeout, MAX_DUMP)
        finally:
            _kill_group(p)  # what it left in its group
        if why is not None:
            raise ServiceError(f"the DPL command {why}; ended")
        if p.returncode != 0:
            tail = err.decode("utf-8", "replace").strip()[-2000:]
            raise ServiceError(
                f"the DPL command failed (exit {p.returncode})" + (f": {tail}" if tail else "")
            )
        return out.decode("utf-8", "replace")


def _bounded_output(
    p: subprocess.Popen[bytes], timeout: float, limit: int
) -> tuple[bytes, bytes, str | None]:
    """Read a child's stdout (at most ``limit`` bytes) and the end of its stderr until it
    closes them, within ``timeout`` seconds: (stdout, stderr's end, why it was cut
    short or None). Nothing it prints is held beyond those bounds. When the command
    itself ends, what it left in its process group is ended too: a process it left
    behind would otherwise hold the pipes open until the timeout."""
    assert p.stdout is not None and p.stderr is not None
    out = bytearray()
    err = bytearray()
    deadline = time.monotonic() + timeout
    exited = os.pidfd_open(p.pid)  # readable once the command itself has ended
    pipes = {p.stdout.fileno(), p.stderr.fileno()}
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ)
            sel.register(p.stderr, selectors.EVENT_READ)
            sel.register(exited, selectors.EVENT_READ)
            while pipes:
                left = deadline - time.monotonic()
                if left <= 0:
                    return bytes(out), bytes(err), f"ran longer than {timeout:g} s"
                for key, _ in sel.select(left):
                    if key.fd == exited:
                        sel.unregister(exited)
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(p.pid, signal.SIGKILL)
                        continue
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        pipes.discard(key.fd)
                    elif key.fileobj is p.stdout:
                        out += chunk
                        if len(out) > limit:
                            why = f"printed more than {limit} bytes"
                            return bytes(out[:limit]), bytes(err), why
                    else:
                        err = (err + chunk)[-4096:]
    finally:
        os.close(exited)
    left = max(0.0, deadline - time.monotonic())
    try:
        p.wait(left)
    except subprocess.TimeoutExpired:
        return bytes(out), bytes(err), f"ran longer than {timeout:g} s"
    return bytes(out), bytes(err), None


def _kill_group(p: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    if p.returncode is None:
        p.wait()
    for pipe in (p.stdout, p.stderr):
        if pipe is not None:
            pipe.close()


def make_site(
    workflow_path: str,
    nodes: Sequence[Node] = (),
    *,
    run_dpl: Callable[[str, Mapping[str, str]], str] | None = None,
    runtime: Mapping[tuple[str, str], str] | None = None,
    catalog: Mapping[str, tuple[str, ...]] | None = None,
) -> Site:
    """The site one expansion of ``workflow_path`` reads (``catalog``: the services'
    healthy endpoints, a snapshot that does not change under the expansion)."""
    labels = {n.name: dict(n.labels) for n in nodes}
    return Site(
        labels=labels,
        runtime=dict(runtime or {}),
        jit=jit_reader(repository_of(workflow_path)),
        run_dpl=run_dpl,
        catalog=catalog,
    )


class _Runtime(Mapping[tuple[str, str], str]):
    """The runtime table as the site reads it: one entry at a time, when asked."""

    def __init__(self, reader: ConfigReader) -> None:
        self._reader = reader

    def __getitem__(self, key: tuple[str, str]) -> str:
        value = self._reader.runtime(*key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: tuple[str, str], default: Any = None) -> Any:
        value = self._reader.runtime(*key)
        return default if value is None else value

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(())

    def __len__(self) -> int:
        return 0


def with_store(site: Site, reader: ConfigReader) -> int:
    """Give ``site`` the configuration store as it is now (its revision, returned: what
    the expansion reads is pinned there) and the runtime table."""
    revision = reader.revision()

    def get(key: str) -> str | None:
        try:
            return reader.payload(key, revision)
        except ConfigError:
            return None

    class _Keys:
        def __contains__(self, key: object) -> bool:
            return isinstance(key, str) and get(key) is not None

    keys = _Keys()

    def render_path(path: str, variables: Mapping[str, str]) -> str:
        key = path.split("@", 1)[0]
        if key.count("/") == 3:  # component/RUNTYPE/role/entry: resolved as apricot does
            key = configpayload.resolve_path(key, keys)
        return configpayload.render(key, get, variables, clock=time.monotonic)

    site.config_render = render_path
    site.config_resolve_fn = lambda c, rt, role, e: configpayload.resolve(c, rt, role, e, keys)
    site.runtime = _Runtime(reader)
    return revision
