"""The prebuilt OHIF viewer at /ohif/: files strictly from its dist, single-page routes,
cross-origin isolation and CSP, sign-in first, the generated app-config.js; and, in
headless Chromium, OHIF showing the 134-slice CT from this archive.

Most tests use a small stand-in dist (``http.ohif_dir``); those marked as needing the real
one use what ``scripts/install-web`` installs (``make test`` runs it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image, ImageStat
from playwright.sync_api import ConsoleMessage, Page, expect, sync_playwright
from pydicom import dcmread
from sqlalchemy import func, select

from cloudfilm import ohif
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.auth.principal import Stage

from auth_helpers import STRONG, make_user, signed_in
from conftest import CT_134, LiveServer, shared_data

pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # serving, not SQL

CHROMIUM = Path("/usr/bin/chromium")
INDEX = (
    '<!doctype html><html><head><link rel="manifest" href="/manifest.json">'
    '<script>console.time("scriptToView"),window.PUBLIC_URL="/"</script>'
    '<script rel="preload" as="script" src="/app-config.js"></script>'
    '<script>function browserImportFunction(n){return import(n)}window.PUBLIC_URL="/"</script>'
    '<script defer src="/app.bundle.0123456789abcdef.js"></script>'
    '<link href="/app.bundle.css" rel="stylesheet"></head><body><div id="root"></div></body>'
    "</html>"
)
BUNDLE = '(() => {\n__webpack_require__.p = "/";\n})();\n' + "// padding\n" * 200


@pytest.fixture
def dist(live_server: LiveServer, tmp_path: Path) -> Path:
    """A stand-in OHIF dist (the shapes of the real one that serving depends on), with a
    secret beside it and a symbolic link pointing at that secret."""
    root = tmp_path / "dist"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text(INDEX)
    (root / "app.bundle.0123456789abcdef.js").write_text(BUNDLE)
    (root / "app.bundle.css").write_text("@font-face{src:url(/a34f9d1faa5f3315.woff2)}")
    (root / "a34f9d1faa5f3315.woff2").write_bytes(b"wOF2" + bytes(64))
    (root / "0ddf166f7a343eda.wasm").write_bytes(b"\0asm" + bytes(64))
    (root / "manifest.json").write_text('{"icons": [{"src": "/assets/icon.png"}]}')
    (root / "assets" / "icon.png").write_bytes(b"\x89PNG")
    (tmp_path / "secret.txt").write_text("not for you")
    (root / "escape.js").symlink_to(tmp_path / "secret.txt")
    (root / "assets" / "up").symlink_to(tmp_path)
    live_server.archive.settings.http.ohif_dir = root
    return root


def _get(server: LiveServer, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", headers=headers, timeout=30)


def _audit_count(server: LiveServer) -> int:
    with server.archive.db.read_session() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def test_dist__find_stays_inside(dist: Path) -> None:
    found = ohif.Dist(dist)
    assert found.find("assets/icon.png") == (dist / "assets" / "icon.png").resolve()
    for path in (
        "../secret.txt",
        "assets/../../secret.txt",
        "/etc/passwd",
        "escape.js",  # a symbolic link leading out
        "assets/up/secret.txt",  # through a linked folder
        "assets\\..\\..\\secret.txt",
        "index.html\x00.png",
        "assets",  # a folder, not a file
        "",
    ):
        assert found.find(path) is None, path


def test_ohif__path_traversal_refused(live_server: LiveServer, dist: Path) -> None:
    headers = signed_in(live_server, _doctor(live_server))
    for path in (
        "/ohif/%2e%2e/secret.txt",
        "/ohif/..%2fsecret.txt",
        "/ohif/assets/%2e%2e/%2e%2e/secret.txt",
        "/ohif//etc/passwd",
        "/ohif/..%5csecret.txt",
        "/ohif/escape.js",
        "/ohif/assets/up/secret.txt",
        "/ohif/%2e%2e/%2e%2e/pyproject.toml",
    ):
        response = _get(live_server, path, headers=headers)
        assert response.status_code == 404, (path, response.status_code)
        assert "not for you" not in response.text and "[project]" not in response.text


def test_ohif__spa_routes_get_the_page_missing_files_404(
    live_server: LiveServer, dist: Path
) -> None:
    headers = signed_in(live_server, _doctor(live_server))
    for path in (
        "/ohif/",
        "/ohif/index.html",
        "/ohif/viewer?StudyInstanceUIDs=1.2.3",
        "/ohif/local",
    ):
        response = _get(live_server, path, headers=headers)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert '<div id="root">' in response.text
    for path in ("/ohif/missing.bundle.js", "/ohif/assets/none.png", "/ohif/1.2.3"):
        assert _get(live_server, path, headers=headers).status_code == 404, path
    redirect = _get(live_server, "/ohif?x=1")
    assert (redirect.status_code, redirect.headers["location"]) == (308, "/ohif/?x=1")


def test_ohif__served_under_ohif_not_root(live_server: LiveServer, dist: Path) -> None:
    """The dist is built for ``/``: its root-relative references are served as /ohif/."""
    headers = signed_in(live_server, _doctor(live_server))
    page = _get(live_server, "/ohif/viewer", headers=headers).text
    assert re.findall(r'(?:href|src)="([^"]*)"', page) == [
        "/ohif/manifest.json",
        "/ohif/app-config.js",
        "/ohif/app.bundle.0123456789abcdef.js",
        "/ohif/app.bundle.css",
    ]
    assert page.count('window.PUBLIC_URL="/ohif/"') == 2
    bundle = _get(live_server, "/ohif/app.bundle.0123456789abcdef.js").text
    assert '__webpack_require__.p = "/ohif/";' in bundle
    assert "url(/ohif/a34f9d1faa5f3315.woff2)" in _get(live_server, "/ohif/app.bundle.css").text
    assert '"src": "/ohif/assets/icon.png"' in _get(live_server, "/ohif/manifest.json").text


def test_ohif__headers(live_server: LiveServer, dist: Path) -> None:
    headers = signed_in(live_server, _doctor(live_server))
    page = _get(live_server, "/ohif/", headers=headers)
    config = _get(live_server, "/ohif/app-config.js")
    bundle = _get(live_server, "/ohif/app.bundle.0123456789abcdef.js")
    wasm = _get(live_server, "/ohif/0ddf166f7a343eda.wasm")
    for response in (page, config, bundle, wasm, _get(live_server, "/ohif/app.bundle.css")):
        assert response.status_code == 200
        assert response.headers["cross-origin-opener-policy"] == "same-origin"
        assert response.headers["cross-origin-embedder-policy"] == "require-corp"
    # The page's CSP: our origin, its two inline scripts by hash, nothing evaluated.
    csp = page.headers["content-security-policy"]
    inline = re.findall(r"<script>(.*?)</script>", page.text)
    assert len(inline) == 2
    for script in inline:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "object-src 'none'" in csp
    assert "'unsafe-eval'" not in csp and "script-src 'self' 'sha256-" in csp
    # Caching: content-hashed names for a year, the rest revalidated.
    assert page.headers["cache-control"] == "no-cache"
    assert config.headers["cache-control"] == "no-cache"
    assert bundle.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert wasm.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert _get(live_server, "/ohif/app.bundle.css").headers["cache-control"] == "no-cache"
    # Media types.
    assert wasm.headers["content-type"] == "application/wasm"
    assert bundle.headers["content-type"] == "text/javascript; charset=utf-8"
    assert config.headers["content-type"] == "text/javascript; charset=utf-8"
    font = _get(live_server, "/ohif/a34f9d1faa5f3315.woff2")
    assert font.headers["content-type"] == "font/woff2"
    # Compressed when the browser accepts it; revalidation answers 304.
    raw = httpx.get(
        f"{live_server.url}/ohif/app.bundle.0123456789abcdef.js",
        headers={"Accept-Encoding": "gzip"},
    )
    assert raw.headers["content-encoding"] == "gzip"
    assert raw.text == bundle.text  # httpx decoded it
    again = _get(
        live_server,
        "/ohif/app.bundle.0123456789abcdef.js",
        headers={"If-None-Match": bundle.headers["etag"]},
    )
    assert again.status_code == 304
    plain = _get(
        live_server,
        "/ohif/app.bundle.0123456789abcdef.js",
        headers={"Accept-Encoding": "identity"},
    )
    assert "content-encoding" not in plain.headers and plain.text == bundle.text


def test_ohif__anonymous_browser_signs_in_first(live_server: LiveServer, dist: Path) -> None:
    before = _audit_count(live_server)
    page = _get(live_server, "/ohif/viewer?StudyInstanceUIDs=1.2.3&SeriesInstanceUIDs=4.5")
    assert page.status_code == 303
    assert page.headers["location"] == (
        "/login?next=%2Fohif%2Fviewer%3FStudyInstanceUIDs%3D1.2.3%26SeriesInstanceUIDs%3D4.5"
    )
    assert _get(live_server, "/ohif/").headers["location"] == "/login?next=%2Fohif%2F"
    # The viewer's files are public (no patient data in them) and not audited ...
    assert _get(live_server, "/ohif/app.bundle.0123456789abcdef.js").status_code == 200
    assert _get(live_server, "/ohif/app-config.js").status_code == 200
    assert _audit_count(live_server) == before
    # ... its data is not.
    assert _get(live_server, "/dicom-web/studies").status_code == 401
    assert _audit_count(live_server) == before + 1
    # Half-way through sign-in (password change pending): back to the sign-in page.
    make_user(live_server, "newbie", ["radiologist"])
    pending = signed_in(live_server, "newbie", Stage.PASSWORD)
    assert _get(live_server, "/ohif/", headers=pending).status_code == 303
    # Signed in without the right to see images: told so, instead of an empty viewer.
    make_user(live_server, "sec", ["secadmin"])
    refused = _get(live_server, "/ohif/", headers=signed_in(live_server, "sec"))
    assert refused.status_code == 403 and "无权阅片" in refused.text


def test_ohif__app_config(live_server: LiveServer, dist: Path) -> None:
    config = _app_config(_get(live_server, "/ohif/app-config.js").text)
    assert config["routerBasename"] == "/ohif"
    assert config["defaultDataSourceName"] == "cloudfilm"
    [source] = config["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    settings = source["configuration"]
    assert settings["qidoRoot"] == settings["wadoRoot"] == f"{live_server.url}/dicom-web"
    assert settings["wadoUriRoot"] == f"{live_server.url}/wado"
    assert settings["imageRendering"] == settings["thumbnailRendering"] == "wadors"
    for flag in (
        "enableStudyLazyLoad",
        "supportsFuzzyMatching",
        "supportsWildcard",
        "omitQuotationForMultipartRequest",
    ):
        assert settings[flag] is True, flag
    assert settings["bulkDataURI"]["enabled"] is True
    assert "requestOptions" not in settings  # the session cookie authorises
    assert (
        "localStorage.setItem('i18nextLng', 'zh')" in _get(live_server, "/ohif/app-config.js").text
    )

    live_server.archive.settings.http.public_url = "https://film.hospital.cn/"
    public = _app_config(_get(live_server, "/ohif/app-config.js").text)
    assert public["dataSources"][0]["configuration"]["qidoRoot"] == (
        "https://film.hospital.cn/dicom-web"
    )


def test_ohif__not_installed_says_how(live_server: LiveServer, tmp_path: Path) -> None:
    live_server.archive.settings.http.ohif_dir = tmp_path / "nothing-here"
    response = _get(live_server, "/ohif/")
    assert response.status_code == 404
    assert "scripts/install-web" in response.text and "OHIF" in response.text


def _app_config(script: str) -> dict[str, object]:
    match = re.search(r"^window\.config = (\{.*?\n\});$", script, re.MULTILINE | re.DOTALL)
    assert match, script
    config: dict[str, object] = json.loads(match.group(1))
    return config


def _doctor(server: LiveServer, username: str = "doc") -> str:
    make_user(server, username, ["radiologist"])
    return username


# ----------------------------------------------------------------------- the real OHIF


def _real_dist() -> Path:
    if not (ohif.DEFAULT_DIST / "index.html").is_file():
        if os.environ.get("CLOUDFILM_TEST_NO_BROWSER") == "1":
            pytest.skip("CLOUDFILM_TEST_NO_BROWSER=1 and OHIF is not installed")
        pytest.fail(
            f"OHIF is not installed at {ohif.DEFAULT_DIST}: run scripts/install-web "
            "(make test does)"
        )
    return ohif.DEFAULT_DIST


def test_real_dist__served_under_ohif(live_server: LiveServer) -> None:
    """Every root-relative reference of the published build's page points under /ohif/,
    and every script, style and worker the page and its bundles load from there is
    served."""
    _real_dist()
    headers = signed_in(live_server, _doctor(live_server))
    page = _get(live_server, "/ohif/", headers=headers).text
    references = re.findall(r'(?:href|src|content)="(/[^"]*)"', page)
    assert references and all(r.startswith("/ohif/") for r in references), references
    scripts = re.findall(r'src="(/ohif/[^"]+\.js)"', page)
    bundle = next(s for s in scripts if "/app.bundle." in s)
    for path in scripts + re.findall(r'href="(/ohif/[^"]+\.css)"', page):
        assert _get(live_server, path).status_code == 200, path
    code = _get(live_server, bundle).text
    assert '__webpack_require__.p = "/ohif/";' in code
    assert '__webpack_require__.p = "/";' not in code


# ------------------------------------------------------------- in a real browser: the CT

#: Console messages of type "error" fail the test, as do failed responses of our server
#: and CSP violations. Ignored: every message below "error" (OHIF logs timings and its
#: hanging-protocol matching at "log"; with OHIF 3.13.2 it printed no warning or error
#: while showing this CT, so nothing at "error" level is exempt).
_OUR_PATHS = ("/ohif", "/dicom-web", "/wado", "/api", "/login", "/static")

_WATCH_CSP = """
document.addEventListener("securitypolicyviolation", (e) => {
  window.reportCspViolation(e.violatedDirective + " " + e.blockedURI + " " + e.sourceFile);
});
"""


@dataclass
class Problems:
    console: list[str] = field(default_factory=list)
    csp: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def check(self) -> None:
        assert self.failed == [], self.failed
        assert self.csp == [], self.csp
        assert self.console == [], self.console


@pytest.fixture
def browser_page() -> Iterator[tuple[Page, Problems]]:
    if not CHROMIUM.exists():
        if os.environ.get("CLOUDFILM_TEST_NO_BROWSER") == "1":
            pytest.skip("CLOUDFILM_TEST_NO_BROWSER=1 and no /usr/bin/chromium")
        pytest.fail(f"{CHROMIUM} is missing: run `make test` (scripts/install-test-deps)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            # WebGL without a GPU: ANGLE on SwiftShader, which Chromium only allows with
            # --enable-unsafe-swiftshader.
            args=[
                "--no-sandbox",
                "--enable-unsafe-swiftshader",
                "--use-gl=angle",
                "--use-angle=swiftshader",
            ],
        )
        context = browser.new_context(locale="zh-CN", viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.set_default_timeout(30_000)
        problems = Problems()

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                problems.console.append(f"{message.text} [{message.location.get('url', '')}]")

        def on_response(response: object) -> None:
            status: int = response.status  # type: ignore[attr-defined]
            url: str = response.url  # type: ignore[attr-defined]
            if status >= 400 and urlsplit(url).path.startswith(_OUR_PATHS):
                problems.failed.append(f"{status} {url}")

        page.on("console", on_console)
        page.on("pageerror", lambda error: problems.console.append(f"pageerror: {error}"))
        page.on("response", on_response)
        page.expose_function("reportCspViolation", lambda text: problems.csp.append(text))
        page.add_init_script(_WATCH_CSP)
        yield page, problems
        context.close()
        browser.close()


def _centre_spread(page: Page, selector: str, path: Path) -> float:
    """Standard deviation of the grey levels in the middle third of ``selector``'s box."""
    box = page.locator(selector).first.bounding_box()
    assert box is not None
    clip = {
        "x": box["x"] + box["width"] / 3,
        "y": box["y"] + box["height"] / 3,
        "width": box["width"] / 3,
        "height": box["height"] / 3,
    }
    page.screenshot(path=str(path), clip=clip)  # type: ignore[arg-type]
    with Image.open(path) as image:
        return float(ImageStat.Stat(image.convert("L")).stddev[0])


def test_ohif__shows_the_ct_in_chromium(
    live_server: LiveServer, browser_page: tuple[Page, Problems], tmp_path: Path
) -> None:
    """Acceptance: sign in through /login, the study list shows the CT, the viewer draws
    it (the middle of the viewport is not blank), and nothing our server answered made
    the browser complain."""
    started = time.monotonic()
    _real_dist()
    files = sorted(shared_data("ct/pancreas_ct_cb_001_axial_134").glob("*.dcm"))
    assert len(files) == 134, CT_134
    for path in files:
        assert live_server.archive.ingest(path.read_bytes(), actor=Actor.cli("pytest")).ok
    first = dcmread(files[0], stop_before_pixels=True)
    patient, study_uid = str(first.PatientName), str(first.StudyInstanceUID)
    make_user(live_server, "doc", ["radiologist"])
    page, problems = browser_page

    page.goto(f"{live_server.url}/ohif/")
    assert urlsplit(page.url).path == "/login" and "next=%2Fohif%2F" in page.url
    page.fill("#username", "doc")
    page.fill("#password", STRONG)
    page.click("#form-login button[type=submit]")
    page.wait_for_url(f"{live_server.url}/ohif/")

    expect(page.get_by_text(patient).first).to_be_visible(timeout=30_000)
    expect(page.get_by_text(str(first.StudyDescription)).first).to_be_visible()
    confirm = page.locator('[data-cy="confirm-and-hide-button"]')
    if confirm.count():
        confirm.first.click()  # OHIF's "for investigational use only" notice
    page.screenshot(path=str(tmp_path / "study-list.png"))

    page.goto(f"{live_server.url}/ohif/viewer?StudyInstanceUIDs={study_uid}")
    canvas = ".cornerstone-canvas"
    expect(page.locator(canvas).first).to_be_visible(timeout=30_000)
    spread = 0.0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spread = _centre_spread(page, canvas, tmp_path / "viewport-centre.png")
        if spread > 8:
            break
        time.sleep(0.5)
    page.screenshot(path=str(tmp_path / "viewer.png"))
    assert spread > 8, f"the viewport's centre is blank (grey-level spread {spread:.1f})"
    assert page.evaluate("window.crossOriginIsolated") is True  # COOP/COEP took effect
    assert page.evaluate("localStorage.getItem('i18nextLng')") == "zh"  # Chinese first
    problems.check()
    assert time.monotonic() - started < 90
