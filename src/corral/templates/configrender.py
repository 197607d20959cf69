"""Rendering configuration payloads as Jinja2 templates, in bounds. Pure.

The rendering half of ``configpayload`` (see its doc for the limits a render keeps),
apart so that what only checks keys and payloads never imports Jinja2.
"""

from __future__ import annotations

import functools
import re
import traceback
from collections.abc import (
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import Any, NoReturn

from jinja2 import BaseLoader, StrictUndefined, TemplateNotFound, TemplateSyntaxError, nodes
from jinja2.environment import Template
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.filters import FILTERS as JINJA_FILTERS
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from corral.templates.configpayload import (
    DEFAULT_TIME_LIMIT,
    MAX_COUNT,
    MAX_INCLUDE_DEPTH,
    MAX_INCLUDES,
    MAX_INDENT,
    MAX_INT_BITS,
    MAX_OUTPUT,
    MAX_PRODUCED,
    MAX_STEPS,
    MAX_VALUE,
    MAX_WIDTH,
    ConfigError,
    ConfigNotFound,
    RenderError,
    base_of,
    check_key,
    include_key,
)


def sources(
    key: str,
    get: Callable[[str], str | None],
    *,
    max_depth: int = MAX_INCLUDE_DEPTH,
    max_includes: int = MAX_INCLUDES,
) -> dict[str, str]:
    """Every payload a render of ``key`` reads (``key`` first), each read once with
    ``get`` (None: no such key). ConfigNotFound when ``key`` has none; RenderError for a
    template error in one, an include that is not a string literal, a missing one (not
    ``ignore missing``), a cycle, more than ``max_depth`` levels or ``max_includes``
    payloads, each naming the key and line."""
    check_key(key)
    base = base_of(key)
    env = _Sandbox({}, base)
    found: dict[str, str] = {}
    height: dict[str, int] = {}  # payloads done: the levels of includes under them
    chain: list[str] = []

    def load(k: str) -> str | None:
        if k not in found:
            if len(found) >= max_includes:
                raise RenderError(
                    f"more than {max_includes} payloads included", chain[-1] if chain else k
                )
            text = get(k)
            if text is None:
                return None
            found[k] = text
        return found[k]

    def visit(k: str) -> int:
        if k in chain:
            cycle = " -> ".join([*chain[chain.index(k) :], k])
            raise RenderError(f"include cycle: {cycle}", chain[-1])
        text = found[k]
        chain.append(k)
        if len(chain) > max_depth:
            raise RenderError(
                f"includes nested more than {max_depth} deep: {' -> '.join(chain)}", k
            )
        deepest = 0
        for names, missing_ok, line in _references(env, text, k):
            keys = [include_key(n, base) for n in names]
            there = [x for x in keys if load(x) is not None]
            if not there and not missing_ok:
                what = keys[0] if len(keys) == 1 else "none of " + ", ".join(keys)
                raise RenderError(f"includes {what}, which does not exist", k, line)
            for x in there:
                below = height.get(x)
                if below is None:
                    below = visit(x)
                elif len(chain) + below > max_depth:
                    raise RenderError(
                        f"includes nested more than {max_depth} deep (through {x})", k, line
                    )
                deepest = max(deepest, below)
        chain.pop()
        height[k] = deepest + 1
        return deepest + 1

    if load(key) is None:
        raise ConfigNotFound(f"no configuration payload at {key}")
    visit(key)
    return found


def _references(env: _Sandbox, text: str, key: str) -> Iterator[tuple[list[str], bool, int]]:
    """The payloads ``text`` includes, imports or extends: (names, ignore missing, line)."""
    try:
        tree = env.parse(text, name=key, filename=key)
    except TemplateSyntaxError as e:
        raise RenderError(e.message or str(e), key, e.lineno) from None
    for node in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        target = node.template  # type: ignore[attr-defined]
        if isinstance(target, nodes.Const) and isinstance(target.value, str):
            names = [target.value]
        elif isinstance(target, nodes.List | nodes.Tuple) and all(
            isinstance(i, nodes.Const) and isinstance(i.value, str) for i in target.items
        ):
            names = [i.value for i in target.items]  # type: ignore[attr-defined]
        else:
            raise RenderError(
                "the name of an included payload must be a string literal (or a list of "
                "them), so that what a render reads is known before it runs",
                key,
                node.lineno,
            )
        yield names, bool(getattr(node, "ignore_missing", False)), node.lineno


# -- rendering -------------------------------------------------------------------------------------


def render(
    key: str,
    get: Callable[[str], str | None],
    variables: Mapping[str, str],
    *,
    max_steps: int = MAX_STEPS,
    clock: Callable[[], float] | None = None,
    time_limit: float = DEFAULT_TIME_LIMIT,
) -> str:
    """The payload at ``key`` rendered with ``variables``, its includes read with ``get``
    (see ``sources``). ``clock`` (seconds): the render stops after ``time_limit`` of it.
    RenderError (a ConfigError) naming the key and line of what failed; ConfigNotFound
    when there is no payload at ``key``."""
    found = sources(key, get)
    env = _Sandbox(found, base_of(key), max_steps=max_steps, clock=clock, time_limit=time_limit)
    out: list[str] = []
    size = 0
    try:
        template = env.get_template(key)
        for chunk in template.generate(dict(variables)):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise _Limit(f"the output is larger than {MAX_OUTPUT} characters")
            out.append(chunk)
    except TemplateSyntaxError as e:
        raise RenderError(e.message or str(e), e.name or key, e.lineno) from None
    except RecursionError as e:
        raise _located("too deeply nested (a macro calling itself?)", key, found, e) from None
    except UndefinedError as e:
        raise _located(f"undefined: {e}", key, found, e) from None
    except SecurityError as e:
        raise _located(f"not allowed: {e}", key, found, e) from None
    except _Limit as e:
        raise _located(str(e), key, found, e) from None
    except ConfigError as e:
        raise _located(str(e), key, found, e) from None
    except Exception as e:  # the template's own error: a bad operand, a division by zero
        raise _located(f"{type(e).__name__}: {e}", key, found, e) from None
    return "".join(out)


def _located(
    message: str, key: str, found: Mapping[str, str], exc: BaseException | None = None
) -> RenderError:
    """The error, at the innermost line of a payload in the traceback (Jinja2 rewrites
    tracebacks to point at templates' lines)."""
    where, line = key, None
    if exc is not None:
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if frame.filename in found:
                where, line = frame.filename, frame.lineno
                break
    return RenderError(message, where, line)


class _Limit(Exception):
    """A render went past one of its limits."""


class _Payloads(BaseLoader):
    """Payloads as templates, from what ``sources`` found."""

    def __init__(self, found: Mapping[str, str]) -> None:
        self.found = found

    def get_source(
        self, environment: Any, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        text = self.found.get(template)
        if text is None:
            raise TemplateNotFound(template)
        return text, template, lambda: True


# str methods a payload may call; the others (ljust, center, zfill, expandtabs, format,
# format_map, encode, translate...) can make a large value from a small one, or reach
# further than text
STR_METHODS = frozenset((
    "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha",
    "isascii", "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric", "isspace",
    "istitle", "isupper", "join", "lower", "lstrip", "partition", "removeprefix",
    "removesuffix", "replace", "rfind", "rindex", "rpartition", "rsplit", "rstrip", "split",
    "splitlines", "startswith", "strip", "swapcase", "title", "upper",
))  # fmt: skip
# Jinja2's filters a payload may use: not pprint, random, urlize, wordwrap
ALLOWED_FILTERS = frozenset((
    "abs", "attr", "batch", "capitalize", "center", "count", "d", "default", "dictsort", "e",
    "escape", "filesizeformat", "first", "float", "forceescape", "format", "groupby", "indent",
    "int", "items", "join", "last", "length", "list", "lower", "map", "max", "min", "reject",
    "rejectattr", "replace", "reverse", "round", "safe", "select", "selectattr", "slice",
    "sort", "string", "striptags", "sum", "title", "tojson", "trim", "truncate", "unique",
    "upper", "urlencode", "wordcount", "xmlattr",
))  # fmt: skip
# what Jinja2 passes along with a call from a loop or block (the variables set there)
_JINJA_KWARGS = frozenset({"_loop_vars", "_block_vars"})
_SCOPES = (nodes.For, nodes.Macro, nodes.CallBlock, nodes.Block)
# %-format specs: flags, width, precision
_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d*))?[a-zA-Z%]")


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox of one render, with its limits (see the module's docstring)."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(
        self,
        found: Mapping[str, str],
        base: str,
        *,
        max_steps: int = MAX_STEPS,
        clock: Callable[[], float] | None = None,
        time_limit: float = DEFAULT_TIME_LIMIT,
    ) -> None:
        super().__init__(
            loader=_Payloads(found),
            undefined=StrictUndefined,
            autoescape=False,
            finalize=self._finalize,
            auto_reload=False,
            keep_trailing_newline=True,
            cache_size=MAX_INCLUDES + 1,  # one render: each payload compiled once
        )
        self.base = base
        self.max_steps = max_steps
        self.clock = clock
        self.time_limit = time_limit
        self.deadline = None if clock is None else clock() + time_limit
        self.steps = 0
        self.produced = 0
        self.globals = {"range": self.globals["range"], "dict": self.globals["dict"]}
        self.filters = {n: self._guarded(n, JINJA_FILTERS[n]) for n in ALLOWED_FILTERS}
        self.policies["json.dumps_kwargs"] = {"sort_keys": True}

    # -- the budget ----

    def _tick(self) -> None:
        self.steps += 1
        if self.steps > self.max_steps:
            raise _Limit(f"more than {self.max_steps} steps (loop iterations, calls, includes)")
        if self.clock is not None and self.deadline is not None and self.clock() > self.deadline:
            raise _Limit(f"took longer than {self.time_limit:g} s")

    def _produce(self, n: int) -> None:
        self.produced += n
        if self.produced > MAX_PRODUCED:
            raise _Limit(f"produced more than {MAX_PRODUCED} characters")

    def corral_charge(self, n: int) -> str:
        """Called at the start of every loop iteration, macro, call block and block
        (``_parse`` puts it there; ``call`` counted the step): the literal text it will
        produce."""
        self._produce(n)
        return ""

    def corral_value(self, value: Any) -> Any:
        """A list, tuple or dict the template writes (``_parse`` wraps them): checked, so
        that a value never holds more than MAX_VALUE, however it shares its parts."""
        self._check(value, "a list or dict")
        return value

    def corral_concat(self, *parts: Any) -> str:
        """``a ~ b``: checked before its parts become text."""
        for p in parts:
            if not isinstance(p, str):
                self._check(p, "an operand of ~")
        text = "".join(str(p) for p in parts)
        self._check(text, "a ~ concatenation")
        return text

    def _finalize(self, value: Any) -> str:
        if not isinstance(value, str):
            self._check(value, "a value")
        text = str(value)  # an undefined value raises here
        self._produce(len(text))
        return text

    def _check(self, value: Any, what: str) -> None:
        if _size(value, MAX_VALUE) > MAX_VALUE:
            raise _Limit(f"{what} is larger than {MAX_VALUE} characters")

    def _check_args(self, args: Iterable[Any], kwargs: Mapping[str, Any]) -> None:
        for a in args:
            self._check(a, "an argument")
        for name, a in kwargs.items():
            if name not in _JINJA_KWARGS:
                self._check(a, "an argument")

    # -- what templates do ----

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for node in tree.find_all(nodes.For):
            if node.recursive:
                raise TemplateSyntaxError(
                    "recursive loops are not allowed in a configuration payload",
                    node.lineno, name, filename,
                )  # fmt: skip
        rewritten = _Rewrite().visit(tree)
        assert isinstance(rewritten, nodes.Template)
        tree = rewritten
        tree.body = _charged(tree.body, 1)
        for scope in list(tree.find_all(_SCOPES)):
            scope.body = _charged(scope.body, scope.lineno)  # type: ignore[attr-defined]
            if isinstance(scope, nodes.For) and scope.else_:
                scope.else_ = _charged(scope.else_, scope.lineno)
        tree.set_environment(self)
        return tree

    def join_path(self, template: str, parent: str) -> str:
        return include_key(template, self.base)

    def get_template(
        self,
        name: str | Template,
        parent: str | None = None,
        globals: MutableMapping[str, Any] | None = None,
    ) -> Template:
        self._tick()
        template: Template = super().get_template(name, parent, globals)
        return template

    # Filters that walk a sequence (select, reject, map, sort by attribute, ...) call a
    # test, a filter or an item lookup per item: each is a step, so a filter chain over a
    # long string or list stops at the budget like a loop does.

    def call_test(
        self,
        name: str,
        value: Any,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        context: Context | None = None,
        eval_ctx: Any = None,
    ) -> Any:
        self._tick()
        return super().call_test(name, value, args, kwargs, context, eval_ctx)

    def call_filter(
        self,
        name: str,
        value: Any,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        context: Context | None = None,
        eval_ctx: Any = None,
    ) -> Any:
        self._tick()
        return super().call_filter(name, value, args, kwargs, context, eval_ctx)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self._tick()
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self._tick()
        return super().getattr(obj, attribute)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        self._tick()
        owner = getattr(obj, "__self__", None)
        if owner is self:  # corral_charge, corral_value, corral_concat: they check
            return obj(*args)
        # a str method, or the sandbox's wrapper of str.format (which has its __wrapped__)
        owner = getattr(getattr(obj, "__wrapped__", obj), "__self__", None)
        if isinstance(owner, str) and not isinstance(obj, type):
            method = getattr(obj, "__name__", "?")
            if method not in STR_METHODS:
                raise SecurityError(f"str.{method}() is not allowed in a configuration payload")
            if method == "replace":
                _check_replace(owner, *args, **kwargs)
            elif method == "join" and args:
                items = list(args[0])
                _check_join(owner, items)
                args = (items, *args[1:])
        self._check_args(args, kwargs)
        result = super().call(context, obj, *args, **kwargs)
        if isinstance(result, str | list | tuple | dict | int):
            self._check(result, "a call's result")
        return result

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        self._tick()
        if operator == "*":
            _check_times(left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "+":
            if _size(left, MAX_VALUE) + _size(right, MAX_VALUE) > MAX_VALUE:
                _refuse(f"a sum larger than {MAX_VALUE} characters")
        elif operator == "%" and isinstance(left, str):
            _check_percent(left)
            self._check(right, "an argument")
        return super().call_binop(context, operator, left, right)

    def _guarded(self, name: str, f: Callable[..., Any]) -> Callable[..., Any]:
        """The filter, counted as a step, its arguments and result checked."""
        skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0  # its context

        @functools.wraps(f)
        def filtered(*args: Any, **kwargs: Any) -> Any:
            self._tick()
            rest = args[skip:]
            self._check_args(rest, kwargs)
            _check_filter(name, rest, kwargs)
            if name == "join" and rest:
                items = list(rest[0])
                _check_join(_arg(rest, kwargs, 1, "d", ""), items)
                args = (*args[:skip], items, *rest[1:])
            result = f(*args, **kwargs)
            if isinstance(result, str | list | tuple | dict):
                self._check(result, f"the result of {name}")
            return result

        return filtered


class _Rewrite(NodeTransformer):
    """Literal lists, tuples and dicts, and ``~``, through the sandbox's checks (not the
    names of included payloads, nor the targets of assignments)."""

    def _through(self, method: str, node: nodes.Expr, args: list[nodes.Expr]) -> nodes.Call:
        attr = nodes.EnvironmentAttribute(method, lineno=node.lineno)
        return nodes.Call(attr, args, [], None, None, lineno=node.lineno)

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self._through("corral_concat", node, node.nodes)

    def _literal(self, node: nodes.List | nodes.Tuple | nodes.Dict) -> nodes.Node:
        self.generic_visit(node)
        if isinstance(node, nodes.Tuple) and node.ctx != "load":
            return node
        return self._through("corral_value", node, [node])

    visit_List = visit_Tuple = visit_Dict = _literal

    def _kept(self, node: nodes.Node) -> nodes.Node:
        return node

    visit_Include = visit_Import = visit_FromImport = visit_Extends = _kept


def _charged(body: list[nodes.Node], lineno: int) -> list[nodes.Node]:
    """``body`` with a ``corral_charge`` of its literal text first (the text of the
    scopes in it is charged by them)."""
    size = 0
    stack: list[nodes.Node] = list(body)
    while stack:
        n = stack.pop()
        if isinstance(n, nodes.TemplateData):
            size += len(n.data)
        elif not isinstance(n, _SCOPES):
            stack.extend(n.iter_child_nodes())
    call = nodes.Call(
        nodes.EnvironmentAttribute("corral_charge", lineno=lineno),
        [nodes.Const(size, lineno=lineno)], [], None, None, lineno=lineno,
    )  # fmt: skip
    return [nodes.Output([call], lineno=lineno), *body]


def _size(value: Any, limit: int) -> int:
    """About how many characters ``value`` holds (text, items, digits); stops counting
    past ``limit``."""
    total = 0
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str | bytes):
            total += len(v)
        elif isinstance(v, bool) or v is None:
            total += 1
        elif isinstance(v, int):
            total += 1 + v.bit_length() // 3
        elif isinstance(v, dict):
            total += len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list | tuple | set | frozenset):
            total += len(v)
            stack.extend(v)
        else:
            total += 1
        if total > limit:
            break
    return total


def _refuse(message: str) -> NoReturn:
    raise _Limit(message)


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _check_times(left: Any, right: Any) -> None:
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, str | list | tuple) and isinstance(n, int):
            if len(seq) * max(n, 0) > MAX_VALUE:
                _refuse(f"a repetition of {len(seq)} items {n} times is too large")
            return
    if (
        isinstance(left, int)
        and isinstance(right, int)
        and left.bit_length() + right.bit_length() > MAX_INT_BITS
    ):
        _refuse(f"a product of more than {MAX_INT_BITS} bits")


def _check_power(left: Any, right: Any) -> None:
    if (
        isinstance(left, int)
        and isinstance(right, int)
        and right > 0
        and abs(left) > 1
        and (right > MAX_INT_BITS or left.bit_length() * right > MAX_INT_BITS)
    ):
        _refuse(f"a power of more than {MAX_INT_BITS} bits")


def _check_percent(fmt: str) -> None:
    for m in _PERCENT.finditer(fmt):
        for n in m.groups():
            if n == "*":
                _refuse("a %-format with '*' is not allowed")
            if n and int(n) > MAX_WIDTH:
                _refuse(f"a %-format width or precision over {MAX_WIDTH}")


def _check_replace(s: Any, old: Any = "", new: Any = "", count: Any = -1) -> None:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return
    times = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    if len(s) + times * (len(new) - len(old)) > MAX_VALUE:
        _refuse(f"replace() would make more than {MAX_VALUE} characters")


def _check_join(sep: Any, items: Collection[Any]) -> None:
    size = len(str(sep)) * max(len(items) - 1, 0)
    for i in items:
        size += _size(i, MAX_VALUE)
        if size > MAX_VALUE:
            break
    if size > MAX_VALUE:
        _refuse(f"join() would make more than {MAX_VALUE} characters")


def _check_filter(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """The filters that could make a large value from small arguments, checked."""
    if name == "center":
        width = _arg(args, kwargs, 1, "width", 80)
        if isinstance(width, int) and width > MAX_WIDTH:
            _refuse(f"center() wider than {MAX_WIDTH}")
    elif name == "indent":
        width = _arg(args, kwargs, 1, "width", 4)
        n = width if isinstance(width, int) else len(str(width))
        if n > MAX_INDENT:
            _refuse(f"indent() of more than {MAX_INDENT}")
        text = args[0] if args else ""
        if isinstance(text, str) and len(text) + n * (text.count("\n") + 1) > MAX_VALUE:
            _refuse(f"indent() would make more than {MAX_VALUE} characters")
    elif name in ("batch", "slice"):
        count = _arg(args, kwargs, 1, "linecount" if name == "batch" else "slices", 1)
        if isinstance(count, int) and count > MAX_COUNT:
            _refuse(f"{name}() of more than {MAX_COUNT}")
    elif name == "tojson":
        indent = _arg(args, kwargs, 1, "indent", None)
        if indent is not None and (indent if isinstance(indent, int) else len(str(indent))) > 16:
            _refuse("tojson() indented more than 16")
    elif name == "replace":
        _check_replace(
            _arg(args, kwargs, 0, "s", ""), _arg(args, kwargs, 1, "old", ""),
            _arg(args, kwargs, 2, "new", ""), _arg(args, kwargs, 3, "count", -1),
        )  # fmt: skip
    elif name == "format" and args and isinstance(args[0], str):
        _check_percent(args[0])
