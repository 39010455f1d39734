"""The sign-in page in a real browser (headless Chromium driven by Playwright): password,
authenticator enrolment, second factor, forced password change, redirect, sign-out.

Uses Debian's Chromium at /usr/bin/chromium, never a browser that Playwright downloads.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyotp
import pytest
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright
from sqlalchemy import select

from cloudfilm.auth.accounts import Accounts
from cloudfilm.auth.models import User
from cloudfilm.auth.roles import seed_builtin_roles

from conftest import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
#: The answers the page expects and shows (wrong password, refused new password): the
#: browser logs each as a failed resource load, which is not a fault of the page.
EXPECTED_FAILURE = re.compile(
    r"^Failed to load resource: the server responded with a status of 40[01] "
)
INITIAL = "Initial#Pass1"
STRONG = "Stronger#Pass2"


@pytest.fixture
def backend() -> str:
    """These tests exercise the page, not the data layer: SQLite only."""
    return "sqlite"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        if os.environ.get("CLOUDFILM_TEST_NO_BROWSER") == "1":
            pytest.skip("CLOUDFILM_TEST_NO_BROWSER=1 and no /usr/bin/chromium")
        pytest.fail(
            f"{CHROMIUM} is missing: run `make test`, which installs Debian's chromium "
            "(scripts/install-test-deps); CLOUDFILM_TEST_NO_BROWSER=1 skips these tests"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True
        )
        yield browser
        browser.close()


@dataclass
class Problems:
    """What the browser reported on every page it showed: console errors, uncaught
    exceptions, CSP violations, requested URLs."""

    console: list[str] = field(default_factory=list)
    csp: list[str] = field(default_factory=list)
    expected: list[str] = field(default_factory=list)
    """Paths of the API answers refused on purpose (each logged as a failed load)."""
    urls: list[str] = field(default_factory=list)
    """Every URL the page asked for: no password may be in one."""

    def check(self) -> None:
        assert self.console == [], self.console
        assert self.csp == [], self.csp
        secrets = (INITIAL, STRONG, "weakpass", "wrong-password")
        assert not [u for u in self.urls if any(s in unquote(u) for s in secrets)]


# Runs in every document before its own scripts (injected by the browser's debugging
# protocol, so the page's CSP does not block it) and reports violations to the test.
_WATCH_CSP = """
document.addEventListener("securitypolicyviolation", (e) => {
  window.reportCspViolation(e.violatedDirective + " " + e.blockedURI + " " + e.sourceFile);
});
"""


@pytest.fixture
def page(browser: Browser) -> Iterator[tuple[Page, Problems]]:
    context = browser.new_context(locale="zh-CN", viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(15_000)
    problems = Problems()

    def on_console(message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        url = message.location.get("url", "")
        if EXPECTED_FAILURE.match(message.text) and urlsplit(url).path.startswith("/api/auth/"):
            problems.expected.append(urlsplit(url).path)
        else:
            problems.console.append(f"{message.text} [{url}]")

    page.on("console", on_console)
    page.on("request", lambda request: problems.urls.append(request.url))
    page.on("pageerror", lambda error: problems.console.append(f"pageerror: {error}"))
    page.expose_function("reportCspViolation", lambda text: problems.csp.append(text))
    page.add_init_script(_WATCH_CSP)
    yield page, problems
    context.close()


def _user(live_server: LiveServer, username: str, role: str) -> None:
    accounts = Accounts(live_server.archive.settings)
    with live_server.archive.db.session() as session:
        seed_builtin_roles(session, accounts.clock.now())
        accounts.create_user(
            session, username=username, display_name="林医生", roles=[role], password=INITIAL
        )


def _screenshot(page: Page, path: Path) -> None:
    """A full-page screenshot that must show something: more than a few colours."""
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 8, f"{path} looks blank"


def _change_password(page: Page, screenshot: Path | None = None) -> None:
    expect(page.locator("#step-password")).to_be_visible()
    expect(page.locator("#reason-initial")).to_be_visible()
    page.fill("#current-password", INITIAL)
    page.fill("#new-password", "weakpass")
    page.fill("#new-password-again", "weakpass")
    page.click("#form-password button[type=submit]")
    expect(page.locator("#error-password")).to_contain_text("口令不符合安全策略")
    expect(page.locator("#error-password")).to_contain_text("password does not meet the policy")
    if screenshot is not None:
        _screenshot(page, screenshot)
    page.fill("#current-password", INITIAL)
    page.fill("#new-password", STRONG)
    page.fill("#new-password-again", STRONG)
    page.click("#form-password button[type=submit]")


def test_login_page__initial_password_is_changed_then_home(
    live_server: LiveServer, page: tuple[Page, Problems], tmp_path: Path
) -> None:
    tab, problems = page
    _user(live_server, "lin", "radiologist")
    # A `next` on another site is ignored: the page goes home instead.
    tab.goto(f"{live_server.url}/login?next=//evil.example/x")
    expect(tab.locator("#form-login button[type=submit]")).to_be_enabled()
    _screenshot(tab, tmp_path / "sign-in.png")

    tab.fill("#username", "lin")
    tab.fill("#password", "wrong-password")
    tab.click("#form-login button[type=submit]")
    expect(tab.locator("#error-login")).to_contain_text("用户名或密码错误")
    expect(tab.locator("#password")).to_have_value("")

    tab.fill("#password", INITIAL)
    tab.click("#form-login button[type=submit]")
    expect(tab.locator("#sign-out")).to_be_visible()
    _change_password(tab, tmp_path / "password-refused.png")
    tab.wait_for_url(f"{live_server.url}/")

    with live_server.archive.db.read_session() as session:
        user = session.scalars(select(User).where(User.username == "lin")).one()
        assert not user.must_change_password
    # Later, a signed-in user may change the password of their own accord.
    tab.goto(f"{live_server.url}/login")
    expect(tab.locator("#step-done")).to_be_visible()
    tab.click("#change-link")
    expect(tab.locator("#step-password")).to_be_visible()
    expect(tab.locator("#reason-initial")).to_be_hidden()
    problems.check()
    assert problems.expected == ["/api/auth/login", "/api/auth/password"]  # wrong, weak


def test_login_page__admin_enrols_authenticator_then_signs_in_with_code(
    live_server: LiveServer, page: tuple[Page, Problems], tmp_path: Path
) -> None:
    tab, problems = page
    _user(live_server, "sec", "secadmin")
    tab.goto(f"{live_server.url}/login?next=%2F%3Ffrom%3Dlogin%23top")
    tab.fill("#username", "sec")
    tab.fill("#password", INITIAL)
    tab.click("#form-login button[type=submit]")

    expect(tab.locator("#step-enrol")).to_be_visible()
    expect(tab.locator("#qr svg path").first).to_be_attached()
    expect(tab.locator("#secret")).not_to_be_empty()
    expect(tab.locator("#otpauth-link")).to_have_attribute("href", re.compile("^otpauth://totp/"))
    _screenshot(tab, tmp_path / "mfa-enrol.png")
    secret = re.sub(r"\s+", "", tab.inner_text("#secret"))
    assert re.fullmatch(r"[A-Z2-7]{16,}", secret), secret
    totp = pyotp.TOTP(secret)

    tab.fill("#enrol-code", "000000" if totp.now() != "000000" else "111111")
    tab.click("#form-enrol button[type=submit]")
    expect(tab.locator("#error-enrol")).to_contain_text("验证码错误")

    tab.fill("#enrol-code", totp.now())
    tab.click("#form-enrol button[type=submit]")
    _change_password(tab)
    tab.wait_for_url(f"{live_server.url}/?from=login#top")  # `next`, query and fragment

    # Signed in: the page offers to continue or sign out; signing out ends the session.
    tab.goto(f"{live_server.url}/login")
    expect(tab.locator("#step-done")).to_be_visible()
    tab.click("#sign-out")
    expect(tab.locator("#step-login")).to_be_visible()
    assert tab.request.get(f"{live_server.url}/api/auth/me").status == 401

    # Next sign-in: the code of the enrolled app (the next time step: a code works once).
    tab.fill("#username", "sec")
    tab.fill("#password", STRONG)
    tab.click("#form-login button[type=submit]")
    expect(tab.locator("#step-code")).to_be_visible()
    tab.fill("#code", totp.at(int(time.time()) + totp.interval))
    tab.click("#form-code button[type=submit]")
    tab.wait_for_url(f"{live_server.url}/")

    problems.check()
    assert problems.expected == ["/api/auth/mfa/verify", "/api/auth/password"]
