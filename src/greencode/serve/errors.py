"""Errors the endpoint answers with, and the JSON shapes each client family understands.

* HF Inference API / TGI / Ollama clients (llm-ls included) read ``{"error": "<message>"}``.
* OpenAI clients read ``{"error": {"message", "type", "param", "code"}}``; llm-ls' OpenAI backend
  reads ``{"detail": [{"loc", "msg", "type"}]}`` with ``loc`` a string. Both are sent on ``/v1``.
"""

from __future__ import annotations

from typing import Optional


class RequestError(Exception):
    """A problem with one request: HTTP ``status`` and a message naming the problem and the fix."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request", loc: Optional[str] = None,
                 details: Optional[list[dict]] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.details = details or [{"loc": loc or "body", "msg": message, "type": kind}]
        self.headers = headers or {}


def error_body(path: str, status: int, message: str, kind: str, details: Optional[list[dict]] = None) -> dict:
    details = details or [{"loc": "request", "msg": message, "type": kind}]
    if path.startswith("/v1"):
        param = details[0]["loc"].split(".", 1)[1] if details[0]["loc"].startswith("body.") else None
        return {"error": {"message": message, "type": kind, "param": param, "code": status}, "detail": details}
    return {"error": message, "error_type": kind, "detail": details}
