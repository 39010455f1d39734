"""The gateway's status API for the console: backlog, throughput, errors, manual retry, and
the "exam is final" trigger (``POST /trigger``) for the RIS/HIS or an interface engine.

A small FastAPI application that ``cloudfilm gateway`` serves on its own port
(``gateway.http_host``/``gateway.http_port``, loopback by default) next to its DICOM work.
It reads and writes only the gateway's own queue. With ``gateway.api_token`` set every
route needs ``Authorization: Bearer <token>``; without one the API refuses to listen on
anything but a loopback address.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from cloudfilm.config import GatewaySettings
from cloudfilm.errors import NotFound
from cloudfilm.gateway.models import StudyState
from cloudfilm.gateway.queue import GatewayQueue
from cloudfilm.gateway.sendback import SendBackQueue

logger = logging.getLogger(__name__)


class APIConfigError(Exception):
    """The status API would be reachable from the network without a token."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: GatewaySettings) -> None:
    """Refuse a non-loopback status API without ``gateway.api_token``."""
    if settings.api_token is None and not is_loopback(settings.http_host):
        raise APIConfigError(
            f"gateway.http_host is {settings.http_host}, not a loopback address: set "
            "CLOUDFILM_GATEWAY__API_TOKEN, or bind the status API to 127.0.0.1"
        )


class TriggerRequest(BaseModel):
    """ "Exam X is final": the study to queue for retrieval now."""

    study_instance_uid: str | None = Field(default=None, max_length=64)
    accession_number: str | None = Field(default=None, max_length=64)
    source: str | None = Field(default=None, max_length=64)
    """The PACS source; default: the only one that is not a file drop."""


class SendBackRequest(BaseModel):
    """A study to bring back from the archive into a hospital node."""

    study_instance_uid: str = Field(min_length=1, max_length=64)
    destination: str = Field(min_length=1, max_length=64)
    """Name of the node in ``gateway.destinations``."""


class TriggerError(Exception):
    """A trigger that cannot be carried out (``status`` is the HTTP status to answer)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


Trigger = Callable[[TriggerRequest], dict[str, Any]]


def create_api(
    queue: GatewayQueue, settings: GatewaySettings, *, trigger: Trigger | None = None
) -> FastAPI:
    """The status API over ``queue``; ``trigger`` carries out ``POST /trigger`` (the running
    gateway's :meth:`Gateway.trigger`)."""
    check_exposure(settings)
    token = settings.api_token.get_secret_value().encode() if settings.api_token else None

    def authorised(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the comparison time does not reveal how much of a guess was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token):
            raise HTTPException(
                401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )

    app = FastAPI(
        title="cloudfilm gateway",
        description="前置服务状态接口 · Gateway status API",
        dependencies=[Depends(authorised)],
        docs_url=None,
        redoc_url=None,
    )

    send_back = SendBackQueue(queue)

    @app.get(
        "/status",
        summary="Per source: backlog by state, throughput in the last hour, last poll/error",
        responses={401: {"description": "Missing or wrong bearer token"}},
    )
    def status() -> JSONResponse:
        summary = queue.summary()
        rates = queue.throughput(hours=1.0)
        sources: list[dict[str, Any]] = []
        for row in summary["sources"]:
            studies: dict[str, int] = row["studies"]
            sources.append(
                {
                    "name": row["name"],
                    "backlog": sum(
                        n
                        for state, n in studies.items()
                        if state not in (StudyState.DELIVERED, StudyState.DEAD)
                    ),
                    "studies_by_state": studies,
                    "last_hour": rates.get(
                        row["name"], {"studies": 0, "instances": 0, "bytes": 0, "mb_per_hour": 0}
                    ),
                    "last_poll_at": row["last_poll_at"],
                    "polled_through": row["polled_through"],
                    "last_error": row["last_error"],
                    "last_error_at": row["last_error_at"],
                }
            )
        return JSONResponse(
            {
                "backlog": summary["backlog"],
                "studies_by_state": summary["studies"],
                "instances_by_state": summary["instances"],
                "sources": sources,
                "send_back_by_state": send_back.summary(),
            }
        )

    @app.get(
        "/studies",
        summary="Studies in the queue, newest first, optionally in one state",
        responses={401: {"description": "Missing or wrong bearer token"}},
    )
    def studies(
        state: Annotated[StudyState | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    ) -> JSONResponse:
        return JSONResponse(queue.studies(limit=limit, state=state))

    @app.post(
        "/studies/{study_uid}/retry",
        summary="Put a failed or dead-lettered study (and its refused instances) back in line",
        responses={
            401: {"description": "Missing or wrong bearer token"},
            404: {"description": "The study is not in the gateway's queue"},
        },
    )
    def retry(study_uid: str) -> JSONResponse:
        try:
            count = queue.retry(study_uid)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        return JSONResponse({"study_instance_uid": study_uid, "requeued": count})

    @app.post(
        "/trigger",
        status_code=202,
        summary="An exam is final (RIS/HIS, interface engine): queue its study for retrieval now",
        responses={
            400: {"description": "Neither a study UID nor an accession number, or no such source"},
            401: {"description": "Missing or wrong bearer token"},
            404: {"description": "The PACS has no study with that accession number"},
            502: {"description": "The PACS could not be asked (accession number only)"},
        },
    )
    def trigger_study(body: TriggerRequest) -> JSONResponse:
        if not (body.study_instance_uid or body.accession_number):
            raise HTTPException(400, "name the study_instance_uid or the accession_number")
        if trigger is None:
            raise HTTPException(503, "triggers are taken only by the running gateway")
        try:
            result = trigger(body)
        except TriggerError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        return JSONResponse(result, status_code=202)

    @app.post(
        "/send-back",
        status_code=202,
        summary="Bring a study back from the archive into a hospital node (C-STORE)",
        responses={
            401: {"description": "Missing or wrong bearer token"},
            404: {"description": "No such destination in gateway.destinations"},
        },
    )
    def request_send_back(body: SendBackRequest) -> JSONResponse:
        try:
            job = send_back.request(body.study_instance_uid, body.destination)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        return JSONResponse(job, status_code=202)

    @app.get(
        "/send-back",
        summary="Send-back jobs, newest first: state, counts, last error",
        responses={401: {"description": "Missing or wrong bearer token"}},
    )
    def list_send_back(limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> JSONResponse:
        return JSONResponse(send_back.jobs(limit=limit))

    @app.get(
        "/send-back/{job_id}",
        summary="One send-back job",
        responses={
            401: {"description": "Missing or wrong bearer token"},
            404: {"description": "No such job"},
        },
    )
    def get_send_back(job_id: int) -> JSONResponse:
        job = send_back.job(job_id)
        if job is None:
            raise HTTPException(404, f"no send-back job {job_id}")
        return JSONResponse(job)

    @app.post(
        "/send-back/{job_id}/retry",
        summary="Put a failed or dead-lettered send-back job back in line",
        responses={
            401: {"description": "Missing or wrong bearer token"},
            404: {"description": "No failed or dead job with that id"},
        },
    )
    def retry_send_back(job_id: int) -> JSONResponse:
        if not send_back.retry(job_id):
            raise HTTPException(404, f"no failed or dead send-back job {job_id}")
        return JSONResponse({"id": job_id, "requeued": 1})

    return app


class APIServer:
    """uvicorn on a thread of the gateway process."""

    def __init__(
        self, queue: GatewayQueue, settings: GatewaySettings, *, trigger: Trigger | None = None
    ) -> None:
        import uvicorn

        self.settings = settings
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_api(queue, settings, trigger=trigger),
                host=settings.http_host,
                port=settings.http_port,
                log_level="warning",
                access_log=False,
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="gateway-api", daemon=True)

    def start(self, timeout: float = 20.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise APIConfigError(
                    f"the status API could not listen on "
                    f"{self.settings.http_host}:{self.settings.http_port}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
