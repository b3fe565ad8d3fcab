"""The route-only API (the "standalone router"): worker selection over HTTP, for a gateway.

``POST /v1/route`` answers which workers a prompt should go to, and why; with ``"book": true``
the router also books the request's load, which the gateway releases with
``POST /v1/route/{request_id}/prefill_complete`` (first token seen) and
``POST /v1/route/{request_id}/free`` (request over). docs/route-api.md is the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ..wire import PreprocessedRequest, RouterConfigOverride, RoutingDecision
from ..wire._request import check_cache_salt
from ._auth import check_route_api
from ._drain import refused_while_draining
from ._errors import HttpError, bad_request, http_error_for
from ._frontend import Frontend
from ._nvext import parse_token_ids
from ._openai import ParsedRequest, json_object
from ._sse import dumps

_FIELDS = frozenset(
    {
        "model",
        "token_ids",
        "messages",
        "prompt",
        "tools",
        "chat_template_kwargs",
        "add_generation_prompt",
        "request_id",
        "book",
        "include_token_ids",
        "router_config_override",
        "cache_salt",
    }
)
_PROMPT_FIELDS = ("token_ids", "messages", "prompt")


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _error(error: HttpError) -> Response:
    return Response(error.body(), error.status, media_type="application/json")


def decision_body(
    decision: RoutingDecision, *, booked: bool, include_token_ids: bool
) -> dict[str, Any]:
    """The JSON answer of ``POST /v1/route`` for ``decision``."""
    legs = []
    chosen_overlap = 0
    chosen_cost: float | None = None
    for selection in decision.selections:
        chosen = next((c for c in selection.candidates if c.worker_id == selection.chosen), None)
        overlap = chosen.overlap_blocks if chosen is not None else 0
        cost = chosen.cost if chosen is not None else None
        if selection.leg != "prefill":
            chosen_overlap, chosen_cost = overlap, cost
        legs.append(
            {
                "leg": selection.leg,
                "worker_id": selection.chosen,
                "policy": selection.policy,
                "reason": selection.reason,
                "overlap_blocks": overlap,
                "cost": cost,
                "excluded": list(selection.excluded),
                "candidates": [
                    {
                        "worker_id": c.worker_id,
                        "overlap_blocks": c.overlap_blocks,
                        "prefill_tokens": c.prefill_tokens,
                        "decode_blocks": c.decode_blocks,
                        "active_requests": c.active_requests,
                        "cost": c.cost,
                    }
                    for c in selection.candidates
                ],
            }
        )
    prefill = decision.prefill_worker_id
    body: dict[str, Any] = {
        "request_id": decision.request_id,
        "booked": booked,
        "disaggregated": decision.disaggregated,
        "decode_worker_id": decision.decode_worker_id,
        "prefill_worker_id": decision.decode_worker_id if prefill is None else prefill,
        "decode_dp_rank": decision.decode_dp_rank,
        "prefill_dp_rank": decision.prefill_dp_rank,
        "prompt_tokens": len(decision.token_ids),
        "overlap_blocks": chosen_overlap,
        "cost": chosen_cost,
        "split_reason": decision.split_reason,
        "selections": legs,
    }
    if include_token_ids:
        body["token_ids"] = list(decision.token_ids)
    return body


class _RouteApi:
    """The endpoints and the set of booked request ids (booked until freed)."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.booked: set[str] = set()

    async def route(self, request: Request) -> Response:
        start = trio.current_time()
        status = 200
        drain = self.frontend.drain
        if drain.draining:
            # A gateway's next route request goes to another router; the frees and
            # prefill_complete calls of what this one booked are still answered.
            drain.refused += 1
            self.frontend.metrics.count_request("/v1/route", 503, 0.0)
            response = _error(refused_while_draining())
            response.headers["connection"] = "close"
            return response
        try:
            response = await self._route(request)
            status = response.status_code
            return response
        except ClientDisconnect:
            status = 499
            return Response(status_code=499)
        except Exception as exc:
            error = http_error_for(exc, preprocessing=True)
            status = error.status
            return _error(error)
        finally:
            self.frontend.metrics.count_request("/v1/route", status, trio.current_time() - start)

    async def _route(self, http_request: Request) -> Response:
        frontend = self.frontend
        check_route_api(http_request.scope, executes=frontend.executes)
        body: Any = _NOT_READ
        with trio.move_on_after(frontend.limits.request_read_timeout):
            body = await _read_json(http_request, frontend.limits.max_body_bytes)
        if body is _NOT_READ:
            raise HttpError(
                408,
                f"the request body did not arrive within {frontend.limits.request_read_timeout:g} "
                "s of its headers (--request-read-timeout); send the body at once",
                code="request_timeout",
            )
        for key in body:
            if key not in _FIELDS:
                raise bad_request(
                    f"unknown field {key!r} in a route request; it may have "
                    + ", ".join(sorted(_FIELDS)),
                    key,
                    code="unknown_parameter",
                )
        model = body.get("model")
        if model is not None and type(model) is not str:
            raise bad_request(f"model must be a string, got {type(model).__name__}", "model")
        missing = None if model is None else frontend.model_not_found(model, "this router")
        if missing is not None:
            raise missing
        given = [name for name in _PROMPT_FIELDS if body.get(name) is not None]
        if len(given) != 1:
            raise bad_request(
                "a route request needs exactly one of token_ids, messages or prompt"
                + (f"; it has {', '.join(given)}" if given else ""),
                given[1] if len(given) > 1 else "token_ids",
            )
        book = _flag(body, "book", False)
        include_token_ids = _flag(body, "include_token_ids", False)
        request_id = body.get("request_id")
        if request_id is not None and (type(request_id) is not str or not request_id):
            raise bad_request("request_id must be a non-empty string", "request_id")
        if request_id is None:
            request_id = frontend.new_id("route")
        elif book and request_id in self.booked:
            raise HttpError(
                409,
                f"request_id {request_id!r} is already booked; free it first "
                f"(POST /v1/route/{request_id}/free) or use a new id",
                param="request_id",
                code="already_booked",
            )
        cache_salt = body.get("cache_salt")
        # Its RequestError names the field: `route` answers it with `http_error_for`'s 400,
        # the same body as the OpenAI endpoints' refusal of a bad salt.
        check_cache_salt(cache_salt)
        tokens = self._tokens(body, given[0])
        override = _override(body.get("router_config_override"))
        request = PreprocessedRequest(
            token_ids=tokens,
            request_id=request_id,
            model=None if model is None else frontend.request_model(model),
            router_config_override=override,
            # The same salt as the request the gateway will send: its overlap is counted over
            # the blocks cached under that salt only (docs/routing.md).
            cache_salt=cache_salt,
        )
        decision = await frontend.pipeline.query(request, book=book)
        if book:
            self.booked.add(request_id)
        return Response(
            dumps(decision_body(decision, booked=book, include_token_ids=include_token_ids)),
            media_type="application/json",
        )

    def _tokens(self, body: dict[str, Any], field: str) -> Sequence[int]:
        frontend = self.frontend
        parsed = ParsedRequest("chat" if field == "messages" else "completion")
        value = body[field]
        if field == "token_ids":
            tokens = parse_token_ids(value, "token_ids")
            return frontend.checked_ids(tokens, "token_ids")
        if field == "messages":
            if type(value) is not list:
                raise bad_request(f"messages must be a list, got {_kind(value)}", "messages")
            parsed.messages = value
            tools = body.get("tools")
            if tools is not None and (
                type(tools) is not list or not all(type(t) is dict for t in tools)
            ):
                raise bad_request("tools must be a list of tool objects", "tools")
            parsed.tools = tools
            kwargs = body.get("chat_template_kwargs")
            if kwargs is not None and type(kwargs) is not dict:
                raise bad_request("chat_template_kwargs must be an object", "chat_template_kwargs")
            parsed.chat_template_kwargs = kwargs
            parsed.add_generation_prompt = _flag(body, "add_generation_prompt", True)
        else:
            if type(value) is not str:
                raise bad_request(f"prompt must be a string, got {_kind(value)}", "prompt")
            parsed.prompt_text = value
        from ._nvext import EMPTY

        # Packed (the built-in byte tokenizer): a route request's ids are only hashed and
        # counted here. A tuple of them was 100,000 pointers (8 bytes a token: byte ids are
        # CPython's cached small ints) built from the UTF-8 bytes, then turned back into u32
        # words to be hashed: most of a long pick's cost.
        return frontend.prompt_tokens(parsed, EMPTY, packed=True)

    async def prefill_complete(self, request: Request) -> Response:
        return self._release(request, free=False)

    async def free(self, request: Request) -> Response:
        return self._release(request, free=True)

    def _release(self, request: Request, *, free: bool) -> Response:
        start = trio.current_time()
        request_id = request.path_params["request_id"]
        endpoint = "/v1/route/{id}/free" if free else "/v1/route/{id}/prefill_complete"
        metrics = self.frontend.metrics
        try:
            check_route_api(request.scope, executes=self.frontend.executes)
        except HttpError as error:
            metrics.count_request(endpoint, error.status, trio.current_time() - start)
            return _error(error)
        if request_id not in self.booked:
            error = HttpError(
                404,
                f'request_id {request_id!r} is not booked (never routed with "book": true, or '
                "already freed); nothing to release",
                param="request_id",
                code="unknown_request",
            )
            metrics.count_request(endpoint, 404, trio.current_time() - start)
            return _error(error)
        pipeline = self.frontend.pipeline
        if free:
            self.booked.discard(request_id)
            pipeline.free(request_id)
        else:
            pipeline.mark_prefill_complete(request_id)
        metrics.count_request(endpoint, 200, trio.current_time() - start)
        return Response(
            dumps({"request_id": request_id, "released": "all" if free else "prefill"}),
            media_type="application/json",
        )


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not bool:
        raise bad_request(f"{name} must be a boolean, got {_kind(value)}", name)
    return value


def _override(value: Any) -> RouterConfigOverride | None:
    if value is None:
        return None
    where = "router_config_override"
    if type(value) is not dict:
        raise bad_request(f"{where} must be an object, got {_kind(value)}", where)
    for key, item in value.items():
        if key not in ("overlap_score_weight", "router_temperature"):
            raise bad_request(
                f"unknown field '{where}.{key}'; it may have overlap_score_weight, "
                "router_temperature",
                f"{where}.{key}",
            )
        if item is not None and (not isinstance(item, int | float) or isinstance(item, bool)):
            raise bad_request(f"{where}.{key} must be a number", f"{where}.{key}")
    try:
        return RouterConfigOverride(**value)
    except Exception as exc:
        raise http_error_for(exc, field_prefix=f"{where}.") from None


#: The body, while it has not arrived.
_NOT_READ: Final = object()


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(
            413, f"the request body is larger than {limit} bytes", code="request_too_large"
        )
    size = 0
    parts = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(
                413, f"the request body is larger than {limit} bytes", code="request_too_large"
            )
        parts.append(chunk)
    return json_object(b"".join(parts))


def route_routes(frontend: Frontend) -> list[Route]:
    api = _RouteApi(frontend)
    return [
        Route("/v1/route", api.route, methods=["POST"]),
        Route("/v1/route/{request_id}/prefill_complete", api.prefill_complete, methods=["POST"]),
        Route("/v1/route/{request_id}/free", api.free, methods=["POST"]),
    ]
