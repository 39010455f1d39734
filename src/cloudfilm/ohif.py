"""The prebuilt OHIF viewer (npm ``@ohif/app``, its ``dist/``) at ``/ohif/``: a second,
professional viewer that clinicians already know, reading this archive over DICOMweb.

The viewer's code is public; its data is not. OHIF calls ``/dicom-web`` on our own origin
and the browser sends the user's session cookie with those requests, so the generated
``app-config.js`` carries no credentials. An anonymous browser opening a viewer page is
sent to ``/login?next=...`` first; the files under ``/ohif/`` (scripts, styles, WASM,
fonts) are served to anyone.

The published dist is built for the root path (webpack ``publicPath`` ``"/"``,
``window.PUBLIC_URL = "/"``, absolute ``/...`` links in ``index.html``, the stylesheet
and the manifest). Rebuilding OHIF with ``PUBLIC_URL=/ohif/`` is what its documentation
asks for; we serve the published build instead and rewrite those few root-relative
references while serving (:data:`_REWRITES`), once per file, kept in memory. The router
base name (``/ohif``) is set in the ``app-config.js`` generated here from the settings.

OHIF's multi-planar and volume rendering want ``SharedArrayBuffer``, which browsers only
offer to cross-origin-isolated pages: every ``/ohif/`` response carries
``Cross-Origin-Opener-Policy: same-origin`` and ``Cross-Origin-Embedder-Policy:
require-corp``. DICOMweb responses need no ``Cross-Origin-Resource-Policy`` for this:
same-origin requests are never blocked by COEP.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from cloudfilm.auth.guard import Permit, principal_of
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Stage
from cloudfilm.config import Settings

router = APIRouter(include_in_schema=False)
_PUBLIC = Depends(Permit.public_route())

PREFIX = "/ohif/"
ROUTER_BASENAME = PREFIX.rstrip("/")
#: Where ``scripts/install-web`` puts the dist in a checkout (``http.ohif_dir`` overrides).
DEFAULT_DIST = (
    Path(__file__).resolve().parents[2] / "web" / "ohif" / "node_modules" / "@ohif" / "app"
).joinpath("dist")

#: Cross-origin isolation, which OHIF needs for SharedArrayBuffer (MPR, volume rendering).
ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}

#: The content security policy of the viewer's page: the least that Chromium reported no
#: violation under while OHIF showed the study list, a CT in the stack viewer and in MPR
#: (tests/web/test_ohif.py; the components inject ``<style>`` elements and ``style``
#: attributes, the viewer draws ``data:`` images). The page's two inline scripts are
#: allowed by their hashes (added per response), not by ``'unsafe-inline'``. OHIF's
#: workers and their WASM codecs run under their own script responses, which carry no
#: policy. A tool that needs more (a violation in the browser's console) widens this.
CSP = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self' 'unsafe-inline'",
    "img-src": "'self' data:",
    "object-src": "'none'",
    "frame-ancestors": "'none'",
    "base-uri": "'self'",
    "form-action": "'self'",
}

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".jsonc": "text/plain; charset=utf-8",
    ".map": "application/json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".xml": "application/xml",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".txt": "text/plain; charset=utf-8",
}
_COMPRESSIBLE = frozenset({".html", ".js", ".mjs", ".css", ".json", ".jsonc", ".map", ".svg"})
#: Webpack's content-hashed names (``app.bundle.0f6159c501addfe9.js``,
#: ``a34f9d1faa5f3315.woff2``): their bytes never change, so browsers may keep them.
_HASHED = re.compile(r"(^|\.)[0-9a-f]{16,}\.[a-z0-9]+$")
_FOREVER = "public, max-age=31536000, immutable"
_REVALIDATE = "no-cache"

_ROOT_ATTRIBUTE = re.compile(rb'\b(href|src|content)="/(?!/)')
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def _rewrite_index(data: bytes) -> bytes:
    data = _ROOT_ATTRIBUTE.sub(rb'\1="' + PREFIX.encode(), data)
    return data.replace(b'window.PUBLIC_URL="/"', b'window.PUBLIC_URL="' + PREFIX.encode() + b'"')


def _rewrite_js(data: bytes) -> bytes:
    # The chunk loader's base (webpack runtime ``public_path``), in the app bundle and in
    # each worker bundle; and the one absolute import, of the microscopy viewer.
    return data.replace(
        b'__webpack_require__.p = "/";', b'__webpack_require__.p = "' + PREFIX.encode() + b'";'
    ).replace(b"'/dicom-microscopy-viewer/", b"'" + PREFIX.encode() + b"dicom-microscopy-viewer/")


def _rewrite_css(data: bytes) -> bytes:
    return re.sub(rb"url\((['\"]?)/(?!/)", rb"url(\1" + PREFIX.encode(), data)


def _rewrite_manifest(data: bytes) -> bytes:
    return re.sub(rb'"(src|start_url)": "/(?!/)', rb'"\1": "' + PREFIX.encode(), data)


def _rewrite_for(relative: str) -> Callable[[bytes], bytes] | None:
    if relative == "index.html":
        return _rewrite_index
    if relative == "manifest.json":
        return _rewrite_manifest
    if relative.endswith((".js", ".mjs")):
        return _rewrite_js
    if relative.endswith(".css"):
        return _rewrite_css
    return None


def refused(relative: str) -> bool:
    """A path that never names a file of the dist: absolute, with ``..``, a backslash or
    a NUL."""
    return (
        relative.startswith("/")
        or "\\" in relative
        or "\x00" in relative
        or ".." in PurePosixPath(relative).parts
    )


@dataclass(frozen=True, slots=True)
class _Served:
    """One file as served: its bytes when rewritten (else read from disk), its gzip form
    when worth having, and the validator browsers revalidate with."""

    stamp: tuple[int, int]
    etag: str
    body: bytes | None
    gzipped: bytes | None


class Dist:
    """The OHIF dist folder: safe lookup of files and their served form."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, _Served] = {}
        self._lock = threading.Lock()

    @property
    def installed(self) -> bool:
        return (self.root / "index.html").is_file()

    def find(self, relative: str) -> Path | None:
        """The file at ``relative`` strictly inside the dist, or ``None``: no ``..``, no
        absolute path, no backslash or NUL, and no symbolic link leading outside."""
        if not relative or refused(relative):
            return None
        root = self.root.resolve()
        candidate = (root / relative).resolve()
        if not candidate.is_relative_to(root) or not candidate.is_file():
            return None
        return candidate

    def served(self, relative: str, path: Path) -> _Served:
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(relative)
        if cached is not None and cached.stamp == stamp:
            return cached
        rewrite = _rewrite_for(relative)
        body: bytes | None = None
        gzipped: bytes | None = None
        if rewrite is not None or path.suffix in _COMPRESSIBLE:
            original = path.read_bytes()
            changed = rewrite(original) if rewrite is not None else original
            body = changed if changed != original else None
            if path.suffix in _COMPRESSIBLE and len(changed) > 1024:
                gzipped = gzip.compress(changed, compresslevel=6, mtime=0)
            digest = hashlib.sha256(changed).hexdigest()[:32]
        else:
            digest = f"{stamp[0]:x}-{stamp[1]:x}"
        served = _Served(stamp, f'"{digest}"', body, gzipped)
        with self._lock:
            self._cache[relative] = served
        return served


_dists: dict[Path, Dist] = {}


def dist_of(settings: Settings) -> Dist:
    root = settings.http.ohif_dir or DEFAULT_DIST
    dist = _dists.get(root)
    if dist is None:
        dist = _dists.setdefault(root, Dist(root))
    return dist


def _headers(cache: str, **extra: str) -> dict[str, str]:
    return {**ISOLATION, "Cache-Control": cache, **extra}


def _not_installed() -> HTMLResponse:
    # Says what to do, not where: the server's folders are none of an anonymous caller's
    # business.
    page = """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8">
<title>OHIF 阅片器未安装 · OHIF viewer not installed</title></head>
<body>
<h1>OHIF 阅片器未安装 · the OHIF viewer is not installed</h1>
<p>在 <code>http.ohif_dir</code> 所指的目录里找不到 OHIF 的 <code>index.html</code>。
在代码目录运行 <code>scripts/install-web</code>（<code>make run</code> 与 <code>make test</code>
会自动运行），或用 <code>CLOUDFILM_HTTP__OHIF_DIR</code> 指向 <code>@ohif/app</code> 的
<code>dist</code> 目录。</p>
<p>No <code>index.html</code> of OHIF where <code>http.ohif_dir</code> points. Run
<code>scripts/install-web</code> in the checkout (<code>make run</code> and
<code>make test</code> do), or point <code>CLOUDFILM_HTTP__OHIF_DIR</code> at the
<code>dist</code> folder of <code>@ohif/app</code>.</p>
<p><a href="/">返回首页 · home</a></p>
</body></html>
"""
    return HTMLResponse(page, status_code=404, headers=_headers("no-store"))


def _forbidden_page() -> HTMLResponse:
    page = """<!doctype html>
<html lang="zh-CN"><head><meta charset="utf-8"><title>无权阅片 · not permitted</title></head>
<body>
<h1>无权阅片 · not permitted</h1>
<p>你的账户没有检索和查看影像的权限（study:search、study:read）。请联系信息科。</p>
<p>Your account may not search or view images (study:search, study:read); ask the IT
department.</p>
<p><a href="/">返回首页 · home</a> · <a href="/login">切换账户 · sign in as someone else</a></p>
</body></html>
"""
    return HTMLResponse(page, status_code=403, headers=_headers("no-store"))


def content_security_policy(page: bytes) -> str:
    """The viewer page's CSP, allowing its inline scripts by their SHA-256."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(page)
    )
    directives = dict(CSP)
    if hashes:
        directives["script-src"] += " " + hashes
    return "; ".join(f"{name} {value}" for name, value in directives.items())


def _page(request: Request, dist: Dist) -> Response:
    """``index.html`` for every viewer route: to signed-in users who may read studies."""
    principal = principal_of(request)
    if not principal.authenticated or principal.stage is not Stage.FULL:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(
            "/login?next=" + quote(target, safe=""),
            status_code=303,
            headers=_headers("no-store"),
        )
    if not {Permission.STUDY_SEARCH, Permission.STUDY_READ} <= principal.permissions:
        return _forbidden_page()
    path = dist.root / "index.html"
    served = dist.served("index.html", path)
    body = served.body if served.body is not None else path.read_bytes()
    return Response(
        body,
        media_type=_MEDIA_TYPES[".html"],
        headers=_headers(_REVALIDATE, **{"Content-Security-Policy": content_security_policy(body)}),
    )


def _file(request: Request, dist: Dist, relative: str, path: Path) -> Response:
    served = dist.served(relative, path)
    cache = _FOREVER if _HASHED.search(path.name) else _REVALIDATE
    media_type = _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
    headers = _headers(cache, ETag=served.etag, Vary="Accept-Encoding")
    if served.etag in [t.strip().removeprefix("W/") for t in _if_none_match(request)]:
        return Response(status_code=304, headers=headers)
    if served.gzipped is not None and _accepts_gzip(request):
        headers["Content-Encoding"] = "gzip"
        return Response(served.gzipped, media_type=media_type, headers=headers)
    body = served.body if served.body is not None else path.read_bytes()
    return Response(body, media_type=media_type, headers=headers)


def _if_none_match(request: Request) -> list[str]:
    return request.headers.get("if-none-match", "").split(",")


def _accepts_gzip(request: Request) -> bool:
    codings = [
        c.split(";")[0].strip() for c in request.headers.get("accept-encoding", "").split(",")
    ]
    return "gzip" in codings


def app_config(settings: Settings, request: Request) -> str:
    """``window.config`` for OHIF: one DICOMweb data source, this archive, authorised by
    the browser's session cookie (no ``requestOptions.auth``)."""
    base = (settings.http.public_url or str(request.base_url)).rstrip("/")
    dicomweb = base + "/dicom-web"
    config = {
        "name": "cloudfilm",
        "routerBasename": ROUTER_BASENAME,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": True,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        # OHIF is not a certified medical device; its notice is shown once, then every
        # 30 days, on the user's confirmation.
        "investigationalUseDialog": {"option": "configure", "days": 30},
        "defaultDataSourceName": "cloudfilm",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "cloudfilm",
                "configuration": {
                    "friendlyName": "Cloud Film 云胶片",
                    "name": "cloudfilm",
                    "qidoRoot": dicomweb,
                    "wadoRoot": dicomweb,
                    "wadoUriRoot": base + "/wado",
                    "qidoSupportsIncludeField": True,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": True,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }
    # Chinese first: OHIF's i18n has a "zh" locale. The language detector reads the
    # ``lng`` query parameter, then its cookie, then localStorage, then the browser's
    # languages; seeding localStorage once makes Chinese the default and leaves a choice
    # made in OHIF's preferences in place.
    return (
        "/* Generated by cloudfilm (src/cloudfilm/ohif.py) from its settings. */\n"
        f"window.config = {json.dumps(config, ensure_ascii=True, indent=2)};\n"
        "try {\n"
        "  if (!window.localStorage.getItem('i18nextLng')) {\n"
        "    window.localStorage.setItem('i18nextLng', 'zh');\n"
        "  }\n"
        "} catch (e) {}\n"
    )


@router.get("/ohif", dependencies=[_PUBLIC])
def ohif_root(request: Request) -> RedirectResponse:
    """``/ohif`` → ``/ohif/`` (relative links in the viewer need the slash)."""
    query = f"?{request.url.query}" if request.url.query else ""
    return RedirectResponse(PREFIX + query, status_code=308, headers=_headers("no-store"))


@router.get("/ohif/{path:path}", dependencies=[_PUBLIC])
def ohif(request: Request, path: str) -> Response:
    """The OHIF viewer: its files, its generated ``app-config.js``, and ``index.html`` for
    every route of the single-page application (``/ohif/viewer?StudyInstanceUIDs=...``)."""
    settings: Settings = request.app.state.archive.settings
    dist = dist_of(settings)
    if not dist.installed:
        return _not_installed()
    if path == "app-config.js":
        return Response(
            app_config(settings, request),
            media_type=_MEDIA_TYPES[".js"],
            headers=_headers(_REVALIDATE),
        )
    if path in ("", "index.html"):
        return _page(request, dist)
    found = dist.find(path)
    if found is not None:
        return _file(request, dist, path, found)
    last = PurePosixPath(path).name
    if "." in last or refused(path):
        # A file that is not there (or a path that is refused): no page instead of it.
        return Response(
            "Not Found", status_code=404, media_type="text/plain", headers=_headers("no-store")
        )
    return _page(request, dist)
