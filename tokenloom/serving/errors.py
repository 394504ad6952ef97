"""Errors as each API shapes them (L6): OpenAI's {"error": {...}} and TGI's {"error", "error_type"}."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from tokenloom.sampling_params import ParameterError

# OpenAI error types by status, as OpenAI and vLLM use them
_OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable",
}
_TGI_TYPES = {400: "validation", 401: "authentication", 404: "not_found", 413: "validation", 422: "validation",
              429: "overloaded", 500: "generation", 503: "unhealthy"}


class ApiError(Exception):
    """A request refused or failed: status, a message naming the problem, the parameter at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @classmethod
    def from_parameter(cls, exc: ParameterError, status: int = 400) -> ApiError:
        return cls(status, str(exc), param=exc.param, code="invalid_parameter")

    def openai(self) -> JSONResponse:
        body: dict[str, Any] = {"error": {
            "message": self.message, "type": _OPENAI_TYPES.get(self.status, "invalid_request_error"),
            "param": self.param, "code": self.code,
        }}
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    def tgi(self) -> JSONResponse:
        status = 422 if self.status == 400 else self.status  # TGI answers bad parameters with 422
        return JSONResponse({"error": self.message, "error_type": _TGI_TYPES.get(self.status, "validation")},
                            status_code=status, headers=self.headers)

    def for_path(self, path: str) -> JSONResponse:
        return self.tgi() if is_tgi_path(path) else self.openai()


TGI_PATHS = ("/generate", "/generate_stream", "/info", "/tokenize")


def is_tgi_path(path: str) -> bool:
    return path in TGI_PATHS


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line naming the fields of pydantic's validation errors, and the first field's name."""
    parts = []
    first: str | None = None
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = ".".join(loc) or None
        first = first or field
        kind = err.get("type", "")
        if kind == "json_invalid":
            return "the request body is not valid JSON: " + str(err.get("ctx", {}).get("error", err.get("msg"))), None
        if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
            return "the request body must be a JSON object", None
        if kind == "extra_forbidden":
            parts.append(f"{field}: not a supported parameter (refused rather than ignored)")
        elif kind == "missing":
            parts.append(f"{field}: required")
        else:
            shown = repr(err.get("input"))
            if len(shown) > 80:
                shown = shown[:77] + "..."
            parts.append(f"{field}: {err.get('msg', 'invalid')}, got {shown}" if field else err.get("msg", "invalid"))
    return "; ".join(parts) or "invalid request", first
