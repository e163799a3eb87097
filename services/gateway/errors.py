"""OpenAI-format errors: `{"error": {"message", "type", "param", "code"}}` (../shared/design/platform.md).

The gateway answers every failure in this shape, its own and the upstream's: Ray Serve answers an unknown model
with FastAPI's `{"detail": ...}` and a crashed replica with plain text, so `normalize_error_body` rewrites any
body that is not already OpenAI-shaped, keeping the status code.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from starlette.responses import JSONResponse

# OpenAI's `type` per status (its API uses invalid_request_error for 400/401/404; `requests` for 429).
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",
}
_CODE_BY_STATUS = {
    400: "bad_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    422: "invalid_request",
    429: "rate_limit_exceeded",
    502: "upstream_unavailable",
    503: "service_unavailable",
    504: "upstream_timeout",
}


def error_type(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(
    status: int, message: str, *, type: str | None = None, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": type or error_type(status),
            "param": param,
            "code": code if code is not None else _CODE_BY_STATUS.get(status),
        }
    }


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, message, type=type, param=param, code=code), status_code=status, headers=headers
    )


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def _detail_message(detail: Any) -> str:
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):  # FastAPI validation errors: [{"loc": [...], "msg": ..., "type": ...}]
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item['msg']}" if loc else str(item["msg"]))
            else:
                parts.append(json.dumps(item, ensure_ascii=False, default=str))
        return "; ".join(parts)
    return json.dumps(detail, ensure_ascii=False, default=str)


def _param_from_detail(detail: Any) -> str | None:
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        loc = [str(p) for p in detail[0].get("loc", []) if p != "body"]
        return ".".join(loc) or None
    return None


def is_openai_error(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("error"), dict) and "message" in obj["error"]


def normalize_error_body(status: int, body: bytes, content_type: str | None = None) -> dict[str, Any]:
    """Any error body -> OpenAI's shape. OpenAI-shaped bodies keep their fields (missing ones are added)."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        obj: Any = json.loads(text) if text else None
    except ValueError:
        obj = None
    if is_openai_error(obj):
        err = obj["error"]
        code = err.get("code")
        return error_body(
            status,
            str(err.get("message") or _reason(status)),
            type=err.get("type") or error_type(status),
            param=err.get("param"),
            code=str(code) if isinstance(code, int) else code,  # vLLM puts the status int here
        )
    if isinstance(obj, dict):
        if isinstance(obj.get("error"), str):  # {"error": "..."}
            return error_body(status, obj["error"])
        if "detail" in obj:  # FastAPI / Starlette / Ray Serve
            return error_body(
                status,
                _detail_message(obj["detail"]) or _reason(status),
                param=_param_from_detail(obj["detail"]),
            )
        if isinstance(obj.get("message"), str):
            return error_body(status, obj["message"], type=obj.get("type"), code=obj.get("code"))
    if text:
        return error_body(status, f"upstream error {status}: {text[:1000]}")
    return error_body(status, f"upstream error {status}: {_reason(status)}")
