"""The sign-in page (password, second factor, forced password change), Chinese first.

The pages' CSP allows scripts and styles from our own origin only, so their JavaScript and
CSS are files served here (the home page's stylesheet too), not inline.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse, Response

from cloudfilm.auth.guard import Permit

router = APIRouter(include_in_schema=False)
_PAGES = Path(__file__).resolve().parent.parent / "templates"
_STATIC = Path(__file__).resolve().parent.parent / "static"


@router.get("/login", response_class=HTMLResponse, dependencies=[Depends(Permit.public_route())])
def login_page() -> HTMLResponse:
    return HTMLResponse((_PAGES / "login.html").read_text("utf-8"))


def _asset(name: str, media_type: str) -> Response:
    # no-cache: revalidate each time, so a new release's script never meets an old page.
    return Response(
        (_STATIC / name).read_bytes(),
        media_type=media_type,
        headers={"Cache-Control": "no-cache"},
    )


@router.get("/static/login.js", dependencies=[Depends(Permit.public_route())])
def login_script() -> Response:
    return _asset("login.js", "text/javascript; charset=utf-8")


@router.get("/static/login.css", dependencies=[Depends(Permit.public_route())])
def login_style() -> Response:
    return _asset("login.css", "text/css; charset=utf-8")


@router.get("/static/home.css", dependencies=[Depends(Permit.public_route())])
def home_style() -> Response:
    return _asset("home.css", "text/css; charset=utf-8")


@router.get(
    "/m/e/{token}", response_class=HTMLResponse, dependencies=[Depends(Permit.public_route())]
)
def entry_page(token: str) -> HTMLResponse:  # noqa: ARG001 - the page's script reads it
    """The patient's entry from a report QR code, label or SMS link (``/api/portal``)."""
    return HTMLResponse(
        (_PAGES / "entry.html").read_text("utf-8"), headers={"Cache-Control": "no-store"}
    )


@router.get("/static/entry.js", dependencies=[Depends(Permit.public_route())])
def entry_script() -> Response:
    return _asset("entry.js", "text/javascript; charset=utf-8")


@router.get("/static/entry.css", dependencies=[Depends(Permit.public_route())])
def entry_style() -> Response:
    return _asset("entry.css", "text/css; charset=utf-8")


@router.get("/static/favicon.svg", dependencies=[Depends(Permit.public_route())])
def favicon() -> Response:
    return _asset("favicon.svg", "image/svg+xml")
