"""The REST API: plain HTTP + JSON over the same Studio, for callers that are not Python.

Mounted at /api/v1 inside Gradio's own FastAPI app (see `rest_routes` and
`masuka.web.server.launch`), so a REST job waits its turn in the runner's one queue
with the page's and gradio_client's jobs, counts against the same rate limit, and
lands in the same history.  Validation is all the Studio's; here `ValueError`
becomes HTTP 422, and the queue's and rate limit's refusals 503 and 429.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import re
import secrets
import threading
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from masuka.core.ratelimit import RateLimited
from masuka.core.runner import QueueFull, Ticket
from masuka.store.jobs import JOB_STATUSES, JobNotFound
from masuka.studio import Caller, NotYourJob, Studio
from masuka.web.guards import LoginGuard, LoginLocked, client_address

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
REALM = "MASUKA"
HISTORY_LIMIT_MAX = 1000
QUEUE_FULL_RETRY_S = 30  # a guess: a few jobs' time; the queue frees up as jobs end
_USER_KEY = "masuka.rest.user"  # where the auth middleware leaves the login for the endpoints
_RETRY_IN = re.compile(r"try again in (\d+) s")

GENERATE_FIELDS = (
    "prompt", "lora", "lora_scale", "seed", "steps", "guidance", "width", "height", "num_images", "speed",
)


def _field(default: Any, kind: str, description: str) -> Any:
    """A body field whose JSON type is documented but not enforced (the Studio checks it)."""
    return Field(default, json_schema_extra={"type": kind}, description=description)


class GenerateBody(BaseModel):
    """The `/generate` parameters.  Types are only documented here: every check (type,
    range, multiple of 16, token count) is the Studio's, so REST, the page and
    gradio_client refuse the same requests with the same messages."""

    model_config = ConfigDict(extra="forbid")

    prompt: Any = _field(..., "string", "what to draw (at most 4000 characters)")
    lora: Any = _field("", "string", 'a LoRA name, or "name1:0.8,name2:0.5"')
    lora_scale: Any = _field(1.0, "number", "scale of LoRAs named without one")
    seed: Any = _field(-1, "integer", "-1 = random; image i uses seed + i")
    steps: Any = _field(None, "integer", "1-100; null = the model's default")
    guidance: Any = _field(None, "number", "0-30; null = the model's default")
    width: Any = _field(None, "integer", "multiple of 16, 256-2048; null = the model's default")
    height: Any = _field(None, "integer", "multiple of 16, 256-2048; null = the model's default")
    num_images: Any = _field(1, "integer", "1-8")
    speed: Any = _field("exact", "string", '"exact" (the full computation) or "fast" (step caching: quicker, '
                        'slightly different images)')


class RestError(Exception):
    """An answer other than success, with the JSON body `{"detail", "parameter"?}`."""

    def __init__(self, status: int, detail: str, *, parameter: str | None = None, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.parameter, self.headers = status, detail, parameter, headers or {}


def parameter_of(message: str) -> str | None:
    """The request parameter a Studio validation message is about: the first word that names one."""
    for word in re.findall(r"[A-Za-z_]+", message):
        if word in GENERATE_FIELDS:
            return word
        if word.lower() in ("lora", "loras"):
            return "lora"
    return None


def retry_after(message: str, default: int) -> str:
    """Seconds to wait, from a refusal's "try again in N s" (the rate limiter says it)."""
    found = _RETRY_IN.search(message)
    return found.group(1) if found else str(default)


def _json_safe(value: Any) -> Any:
    """A history cell as plain JSON: numpy scalars as numbers, pandas' NA and NaN as null."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    import pandas as pd  # already loaded: the history table is built with it

    return None if pd.isna(value) else value


# ---- auth ------------------------------------------------------------------------------
def _credentials(header: str) -> tuple[str, str] | None:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def login_matches(header: str | None, auth: tuple[str, str]) -> str | None:
    """The login name when the `Authorization` header carries exactly these credentials, else None."""
    given = _credentials(header or "")
    if given is None:
        return None
    # Both compared every time, in constant time: a wrong name answers as fast as a wrong password.
    user_ok = secrets.compare_digest(given[0].encode(), auth[0].encode())
    password_ok = secrets.compare_digest(given[1].encode(), auth[1].encode())
    return given[0] if user_ok and password_ok else None


class BasicAuth:
    """Every route of the REST app (the docs too) behind HTTP basic auth.

    A middleware rather than a dependency, so a caller without the password gets 401
    before anything else is read (the body, the path: an unknown route is 401 too)."""

    def __init__(
        self, app: ASGIApp, auth: tuple[str, str], login: LoginGuard | None = None, trust_forwarded: bool = False
    ):
        self.app, self.auth = app, auth
        self.login = login or LoginGuard()  # the page's guard when launched: one count of failures
        self.trust_forwarded = trust_forwarded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"), None)
        given = _credentials(header or "")
        address = client_address(scope, trust_forwarded=self.trust_forwarded)
        claimed = given[0] if given else None
        try:
            delay = self.login.check(address, claimed)  # repeated failures: slower, then refused
        except LoginLocked as exc:
            await JSONResponse(
                {"detail": str(exc)}, status_code=429, headers={"Retry-After": str(math.ceil(exc.retry_after_s))}
            )(scope, receive, send)
            return
        if delay:
            await asyncio.sleep(delay)
        user = login_matches(header, self.auth)
        if user is None:
            self.login.failed(address, claimed)
        else:
            self.login.succeeded(address, claimed)
        if user is None:
            response = JSONResponse(
                {"detail": "this API needs the app's user name and password (HTTP basic auth)"},
                status_code=401,
                headers={"WWW-Authenticate": f'Basic realm="{REALM}"'},
            )
            await response(scope, receive, send)
            return
        scope[_USER_KEY] = user
        await self.app(scope, receive, send)


def caller_of(request: Request) -> Caller:
    """Who is calling: the login (when the app has a password) and the client's address."""
    client = request.client
    return Caller(user=request.scope.get(_USER_KEY), address=client.host if client is not None else None)


# ---- records ---------------------------------------------------------------------------
def _root(request: Request) -> str:
    """Where this app is mounted (with any proxy prefix), for the URLs in records."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def rest_record(studio: Studio, job_id: str, request: Request) -> dict[str, Any]:
    """The Studio's public record, plus image URLs and, while in the queue, the position."""
    try:
        record = studio.job(job_id)
    except JobNotFound:
        raise RestError(404, f"no job with id {job_id!r}") from None
    root = _root(request)
    record["images"] = [f"{root}/jobs/{record['job_id']}/images/{i}" for i in range(len(record.get("outputs") or []))]
    record["position"] = studio.position(record["job_id"])  # 0 running, n n-th in line, else null
    progress = studio.progress(record["job_id"])
    record["progress"] = None if progress is None else {"steps_done": progress[0], "steps_total": progress[1]}
    return record


def _setter(event: asyncio.Event, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """A callback for another thread that sets `event` in its loop."""

    def set_event() -> None:
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the server stopped while the job ran: nobody is waiting
            pass

    return set_event


# ---- the app ---------------------------------------------------------------------------
DESCRIPTION = """
Generate images and read the job history over plain HTTP + JSON.  Jobs wait in the same
queue as the page's and gradio_client's, count against the same rate limit and show in
the same history.  When the app has a password (`--auth USER:PASS`), every route takes
HTTP basic auth with it.  Errors are `{"detail": "...", "parameter": "..."}`
(`parameter` when one request parameter is at fault).
"""


def create_rest_app(
    studio: Studio,
    auth: tuple[str, str] | None = None,
    *,
    login: LoginGuard | None = None,
    trust_forwarded: bool = False,
) -> FastAPI:
    """The REST app (mount it at /api/v1); `auth` is the app's (user, password) or None."""
    app = FastAPI(
        title="MASUKA REST API",
        version="1",
        description=DESCRIPTION,
        docs_url="/docs",
        openapi_url="/openapi.json",
        redoc_url=None,
    )
    if auth is not None:
        app.add_middleware(BasicAuth, auth=auth, login=login, trust_forwarded=trust_forwarded)

    @app.exception_handler(RestError)
    async def _rest_error(_request: Request, exc: RestError) -> JSONResponse:
        body: dict[str, Any] = {"detail": exc.detail}
        if exc.parameter:
            body["parameter"] = exc.parameter
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
        parameter = loc[0] if loc else "body"
        if error.get("type") == "extra_forbidden":
            detail = f"unknown parameter {parameter!r}; the parameters are {', '.join(GENERATE_FIELDS)}"
        elif error.get("type") == "missing":
            detail = f"{parameter} is required"
        elif error.get("type") == "json_invalid":
            detail, parameter = "the body must be a JSON object", "body"
        else:
            detail = f"{parameter}: {error.get('msg', 'invalid')}"
        return JSONResponse({"detail": detail, "parameter": parameter}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.post("/generate", status_code=202, summary="Queue a generation (or wait for it with ?wait=true)")
    async def generate(
        body: GenerateBody, request: Request, wait: bool = Query(False, description="answer when the job has ended")
    ) -> JSONResponse:
        """202 with the queued job's record and a `Location` to poll; with `?wait=true`, 200 with the
        ended job's record, whatever its status (completed, failed with its `error`, or cancelled)."""
        caller = caller_of(request)

        def submit() -> Ticket:
            try:
                return studio.submit(studio.validate(**body.model_dump()), caller)
            except RateLimited as exc:
                raise RestError(429, str(exc), headers={"Retry-After": retry_after(str(exc), 60)}) from None
            except QueueFull as exc:
                raise RestError(503, str(exc), headers={"Retry-After": str(QUEUE_FULL_RETRY_S)}) from None
            except ValueError as exc:
                raise RestError(422, str(exc), parameter=parameter_of(str(exc))) from None

        ticket = await run_in_threadpool(submit)
        if wait:
            # The runner forgets a job once it ends; here only the waiting request needs waking.
            # A thread of its own, not the threadpool: a long wait must not hold a worker others need.
            ended = asyncio.Event()
            set_ended = _setter(ended, asyncio.get_running_loop())
            threading.Thread(
                target=lambda: (ticket.done.wait(), set_ended()), name=f"masuka-rest-{ticket.job_id}", daemon=True
            ).start()
            await ended.wait()
        record = await run_in_threadpool(rest_record, studio, ticket.job_id, request)
        location = f"{_root(request)}/jobs/{ticket.job_id}"
        return JSONResponse(record, status_code=200 if wait else 202, headers={"Location": location})

    @app.get("/jobs/{job_id}", summary="One job's record")
    def job(job_id: str, request: Request) -> dict:
        """The record: status, parameters, seeds, `images` (URLs), `error`/`traceback` of a failure,
        `position` (0 running, n = n-th in line, null once ended) and `progress`."""
        return rest_record(studio, job_id, request)

    @app.get(
        "/jobs/{job_id}/images/{index}",
        summary="One image of a job (PNG)",
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}}},
    )
    def image(job_id: str, index: int) -> FileResponse:
        """Image `index` (from 0) of a completed job, with its settings in the PNG's metadata."""
        try:
            outputs = studio.job(job_id).get("outputs") or []
        except JobNotFound:
            raise RestError(404, f"no job with id {job_id!r}") from None
        if not 0 <= index < len(outputs):
            raise RestError(404, f"job {job_id} has {len(outputs)} image(s); there is no image {index}")
        # Only a file the job lists, inside the outputs folder (the same folder the page serves).
        path = Path(outputs[index]).resolve()
        if not path.is_relative_to(studio.outputs_dir.resolve()) or not path.is_file():
            raise RestError(404, f"image {index} of job {job_id} is no longer on disk")
        return FileResponse(path, media_type="image/png", filename=path.name, content_disposition_type="inline")

    @app.post("/jobs/{job_id}/cancel", summary="Cancel a waiting or running job")
    def cancel(job_id: str, request: Request) -> dict:
        """200 with the record and `cancelled` (false when the job had already ended).  A waiting job
        is cancelled at once; a running one stops at its next step (poll until `status` is cancelled).
        403 for another login's job."""
        try:
            answer = studio.cancel(job_id, caller_of(request))
        except JobNotFound:
            raise RestError(404, f"no job with id {job_id!r}") from None
        except NotYourJob as exc:
            raise RestError(403, str(exc)) from None
        return rest_record(studio, job_id, request) | {"cancelled": answer["cancelled"]}

    @app.get("/jobs", summary="The job history, newest first")
    def jobs(
        limit: int = Query(50, description=f"1-{HISTORY_LIMIT_MAX}"),
        status: str = Query("", description=f"one of {', '.join(JOB_STATUSES)} (empty: all)"),
        search: str = Query("", description="text the prompt contains (any case)"),
    ) -> list[dict]:
        """Rows: job_id, created_at, status, prompt, lora, seed, steps, duration_s, error."""
        if not 1 <= limit <= HISTORY_LIMIT_MAX:
            raise RestError(422, f"limit must be from 1 to {HISTORY_LIMIT_MAX}, got {limit}", parameter="limit")
        if status and status not in JOB_STATUSES:
            raise RestError(422, f"status must be one of {', '.join(JOB_STATUSES)}, got {status!r}", parameter="status")
        rows = studio.history(limit, status or None, search or None)
        return [{key: _json_safe(value) for key, value in row.items()} for row in rows]

    @app.get("/loras", summary="The LoRA library")
    def loras() -> list[dict]:
        """Each LoRA: name, size, sha256, source, format, trigger words, state."""
        return studio.loras()

    return app


def rest_routes(
    studio: Studio,
    auth: tuple[str, str] | None = None,
    *,
    login: LoginGuard | None = None,
    trust_forwarded: bool = False,
) -> list[BaseRoute]:
    """The routes to hand Gradio's app (`launch(app_kwargs={"routes": ...})`): the REST app at /api/v1.

    Gradio registers routes given this way before its own, so /api/v1 is never
    shadowed by Gradio's catch-all routes."""
    return [Mount(PREFIX, app=create_rest_app(studio, auth, login=login, trust_forwarded=trust_forwarded))]
