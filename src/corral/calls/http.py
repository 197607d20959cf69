"""The ``http`` call plugin: ``Post(url)`` and ``Get(url)``; a 2xx answer is success.

The POST body is the call's context as JSON. Cancellation (the call's timeout) closes
the connection at once: httpx's async client is cancelled with the awaiting coroutine.
"""

from __future__ import annotations

from corral.calls._registry import CallContext, CallError

BODY_CAP = 64 * 1024


class HttpPlugin:
    methods = frozenset({"Post", "Get"})

    async def call(self, method: str, args: tuple[object, ...], ctx: CallContext) -> str | None:
        if len(args) != 1 or not isinstance(args[0], str):
            raise CallError(f"http.{method} wants one URL, got {len(args)} arguments")
        url = args[0]
        if not url.startswith(("http://", "https://")):
            raise CallError(f"http.{method}: {url!r} is not an http:// or https:// URL")
        body = {
            "environment_id": ctx.environment_id,
            "event": ctx.event,
            "trigger": ctx.trigger,
            "path": ctx.path,
            "func": ctx.func,
            "run_number": ctx.run_number,
            "variables": dict(ctx.variables),
        }
        import httpx  # (here: ~150 ms to import, which `corral run` need not pay at start)

        try:
            async with httpx.AsyncClient(timeout=None) as client:
                if method == "Post":
                    r = await client.post(url, json=body)
                else:
                    r = await client.get(url)
        except httpx.HTTPError as e:
            raise CallError(f"http.{method} {url}: {type(e).__name__}: {e or 'failed'}") from None
        text = r.text[:BODY_CAP]
        if not 200 <= r.status_code < 300:
            raise CallError(f"http.{method} {url}: status {r.status_code}: {text[:200]!r}")
        return text
