"""The authorisation hook every protected HTTP route depends on."""

from __future__ import annotations

from fastapi import HTTPException, Request

from cloudfilm.audit.enums import ActorType
from cloudfilm.audit.service import Actor
from cloudfilm.auth.service import authenticate


def client_address(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "unknown"


def require_actor(request: Request) -> Actor:
    """The caller, from ``Authorization: Bearer <token>``; 401 otherwise.

    The audit middleware records every request, this refusal included.
    """
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        archive = request.app.state.archive
        with archive.db.read_session() as session:
            client = authenticate(session=session, token=token.strip())
        if client is not None:
            actor = Actor(
                ActorType.CLIENT,
                client.name,
                source=client_address(request),
                role="integration-client",
            )
            request.state.actor = actor
            return actor
    raise HTTPException(
        status_code=401,
        detail="authentication required: send Authorization: Bearer <token> "
        "(create one with `cloudfilm client create NAME`)",
        headers={"WWW-Authenticate": 'Bearer realm="cloudfilm"'},
    )
