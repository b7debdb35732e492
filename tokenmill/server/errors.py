"""One error envelope for every failure: `{"error": {"message", "type", "param", "code"}}`.

Routes raise `APIError`; the handlers installed by `install_error_handlers` turn it, FastAPI's
validation errors, Starlette's HTTP errors and `SamplingParamsError` into that envelope with
OpenAI's status codes. A client's mistake is never a 422 or a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tokenmill.engine.async_llm import EngineDeadError, StepFailedError
from tokenmill.engine.llm_engine import PromptError
from tokenmill.sampling_params import SamplingParamsError

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def context_length_exceeded(message: str, param: str) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, "context_length_exceeded")


def model_not_found(model: str, served: list[str]) -> APIError:
    """404 for a model id that is not served, naming the ids that are."""
    return APIError(404, f"The model `{model}` does not exist or you do not have access to it. "
                    f"Served models: {', '.join(served)}.", INVALID_REQUEST, "model",
                    "model_not_found")


def invalid_api_key(message: str) -> APIError:
    return APIError(401, message, INVALID_REQUEST, None, "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, SERVER_ERROR, None, code, headers={"Retry-After": "1"})


def not_supported(param: str, what: str) -> APIError:
    return invalid_request(f"{what} is not supported yet", param, "unsupported_parameter")


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, INVALID_REQUEST, param, "not_found")


def permission_denied(message: str, param: str | None = None) -> APIError:
    return APIError(403, message, INVALID_REQUEST, param, "permission_denied")


def rate_limited(code: str, message: str, headers: dict[str, str]) -> APIError:
    """429: `rate_limit_exceeded` (Retry-After in `headers`) or `insufficient_quota`."""
    kind = "insufficient_quota" if code == "insufficient_quota" else "requests"
    return APIError(429, message, kind, None, code, headers=headers)


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body exceeds the limit of {limit} bytes.",
                    INVALID_REQUEST, None, "request_too_large")


def internal_error(request_id: str | None = None) -> APIError:
    """A 500 that says nothing of its cause; the request id lets the operator find the
    traceback in the log."""
    which = f" (request id {request_id})" if request_id else ""
    return APIError(500, f"The server had an error while processing your request{which}. "
                    "Retry, or report the request id if it keeps happening.", SERVER_ERROR, None,
                    "internal_error")


def to_api_error(exc: BaseException) -> APIError:
    """The one mapping from an exception to the error a client sees, for JSON responses and SSE
    error events alike. Unexpected exceptions become a 500 that reveals nothing of `exc`."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return validation_error_to_api_error(list(exc.errors()))
    if isinstance(exc, SamplingParamsError):
        return invalid_request(str(exc), exc.param, "invalid_value")
    if isinstance(exc, PromptError):  # routes check prompts first and name the parameter
        return invalid_request(str(exc), None, "invalid_value")
    if isinstance(exc, EngineDeadError):
        return unavailable("The inference engine stopped.", "engine_unavailable")
    if isinstance(exc, StepFailedError):  # logged by the engine, with its traceback
        return APIError(500, "The server had an error while generating this request; the "
                        "request was dropped, and a retry may succeed.", SERVER_ERROR, None,
                        "engine_step_failed")
    return internal_error()


def validation_error_to_api_error(errors: list[dict]) -> APIError:
    """Map pydantic's error list to one 400 naming the first offending field."""
    if not errors:
        return invalid_request("Invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # Drop pydantic's union-branch labels ("str", "list[str]", "function-after[...]").
    loc = [p for p in loc if not _is_type_label(p)]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return invalid_request("We could not parse the JSON body of your request. "
                               "(HINT: this likely means you aren't using your HTTP library "
                               "correctly.)")
    if err.get("type") == "missing":
        return invalid_request(f"Missing required parameter: '{param}'.", param,
                               "missing_required_parameter")
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    where = f"'{param}'" if param else "the request body"
    return invalid_request(f"Invalid value for {where}: {msg}", param, "invalid_value")


def _is_type_label(part: str) -> bool:
    return (not part.isdigit() and ("[" in part or part in {"str", "int", "float", "bool",
            "list", "dict", "TextPart", "OtherPart"} or part.startswith("function-")))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            err = APIError(404, f"Unknown route {request.method} {request.url.path}",
                           INVALID_REQUEST, None, "not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"Method {request.method} not allowed on {request.url.path}",
                           INVALID_REQUEST, None, "method_not_allowed")
        elif exc.status_code == 413:
            err = APIError(413, str(exc.detail), INVALID_REQUEST, None, "request_too_large")
        elif exc.status_code == 400:  # FastAPI: a body it could not parse (e.g. nested too deep)
            err = invalid_request(f"Invalid request body: {exc.detail}")
        else:
            err = APIError(exc.status_code, str(exc.detail),
                           INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR)
        return err.response()

    async def _mapped(request: Request, exc: Exception):
        if isinstance(exc, EngineDeadError):
            log.error("engine is dead: %s", exc)
        return to_api_error(exc).response()

    # Each class by name. Any other exception reaches GuardMiddleware (server/middleware.py),
    # which logs it once and answers the 500.
    for cls in (APIError, RequestValidationError, SamplingParamsError, PromptError,
                EngineDeadError, StepFailedError):
        app.add_exception_handler(cls, _mapped)

