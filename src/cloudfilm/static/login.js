// The sign-in page: password → second factor (enrol or code) → forced password change →
// done. It talks only to /api/auth/*; credentials travel in JSON POST bodies, never in a URL.
// Served as a file because the page's CSP allows no inline script.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const STEPS = ["step-login", "step-enrol", "step-code", "step-password", "step-done"];
  const params = new URLSearchParams(window.location.search);

  let csrf = ""; // the newest CSRF token: it changes at every step
  let finishing = false; // true once this page has walked a sign-in (or change) to the end
  let enrolling = false; // a setup request is under way or done for this session stage

  // ------------------------------------------------------------------ helpers

  /** Where to go when done: `next` if it is a path on this site, else "/". */
  function target() {
    const next = params.get("next") || "";
    // "//host" and "/\host" are other sites; control characters are stripped by URL parsing,
    // so a raw check and an origin check after parsing are both needed.
    if (!next.startsWith("/") || next.startsWith("//") || next.startsWith("/\\")) return "/";
    if (/[\u0000-\u001f\u007f\\]/.test(next)) return "/";
    let url;
    try {
      url = new URL(next, window.location.origin);
    } catch (_err) {
      return "/";
    }
    if (url.origin !== window.location.origin || url.pathname === "/login") return "/";
    return url.pathname + url.search + url.hash;
  }

  function cookie(name) {
    for (const part of document.cookie.split(";")) {
      const [key, ...rest] = part.trim().split("=");
      if (key === name) return decodeURIComponent(rest.join("="));
    }
    return "";
  }

  function cookieCsrf() {
    return cookie("__Host-cf_csrf") || cookie("cf_csrf");
  }

  /** One JSON call; returns {ok, status, data}. Never throws for HTTP errors. */
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (method !== "GET") headers["X-CSRF-Token"] = csrf || cookieCsrf();
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: "same-origin",
        cache: "no-store",
      });
    } catch (_err) {
      return {
        ok: false,
        status: 0,
        data: { error: "network", message: "无法连接服务器 · cannot reach the server" },
      };
    }
    let data = null;
    try {
      data = await response.json();
    } catch (_err) {
      data = null;
    }
    if (data && typeof data.csrf_token === "string" && data.csrf_token) csrf = data.csrf_token;
    if (!response.ok && !(data && data.message)) {
      data = {
        error: (data && data.error) || "http_" + response.status,
        message: "请求失败 · request failed (HTTP " + response.status + ")",
      };
    }
    return { ok: response.ok, status: response.status, data };
  }

  function showStep(id) {
    for (const step of STEPS) $(step).hidden = step !== id;
    const section = $(id);
    const first = section.querySelector("input:not([hidden]):not([readonly])");
    if (first) {
      first.focus();
    } else {
      const heading = section.querySelector("h1");
      heading.setAttribute("tabindex", "-1"); // focus moves to the new step for screen readers
      heading.focus();
    }
  }

  /** "中文 · English" as Chinese text followed by smaller English. */
  function bilingual(text) {
    const parts = [];
    const cut = text.indexOf(" · ");
    parts.push(document.createTextNode(cut < 0 ? text : text.slice(0, cut) + " "));
    if (cut >= 0) {
      const en = document.createElement("span");
      en.className = "en";
      en.lang = "en";
      en.textContent = text.slice(cut + 3);
      parts.push(en);
    }
    return parts;
  }

  /** The server's message; "summary: item; item" (the password policy) as a list. */
  function showError(step, message) {
    const box = $("error-" + step);
    box.replaceChildren();
    box.hidden = !message;
    if (!message) return;
    const colon = message.indexOf(": ");
    const items = colon < 0 ? [] : message.slice(colon + 2).split("; ");
    if (items.length < 2) {
      box.append(...bilingual(message));
      return;
    }
    box.append(...bilingual(message.slice(0, colon)));
    const list = document.createElement("ul");
    for (const item of items) {
      const li = document.createElement("li");
      li.append(...bilingual(item));
      list.append(li);
    }
    box.append(list);
  }

  function clearErrors() {
    for (const step of ["login", "enrol", "code", "password"]) showError(step, "");
  }

  function setBusy(form, busy) {
    const button = form.querySelector("button[type=submit]");
    button.disabled = busy;
    form.setAttribute("aria-busy", busy ? "true" : "false");
  }

  function signedOut(message) {
    csrf = "";
    enrolling = false;
    $("sign-out").hidden = true;
    $("who").hidden = true;
    $("password").value = "";
    showStep("step-login");
    showError("login", message || "");
  }

  // ------------------------------------------------------------------ stages

  /** Show the step that the server's state asks for. */
  async function render(state) {
    if (state.csrf_token) csrf = state.csrf_token;
    $("sign-out").hidden = false;
    const who = $("who");
    who.textContent = state.display_name
      ? state.display_name + "（" + state.username + "）"
      : state.username;
    who.hidden = false;
    $("pw-username").value = state.username || "";
    if (state.stage === "mfa") {
      if (state.mfa_enabled) {
        $("code").value = "";
        showStep("step-code");
      } else {
        await enrol();
      }
    } else if (state.stage === "password") {
      passwordStep(state.password_change);
    } else if (finishing) {
      done(true);
    } else if (params.get("change") === "password") {
      passwordStep(null);
    } else {
      done(false);
    }
  }

  async function enrol() {
    if (enrolling) return;
    enrolling = true;
    $("enrol-code").value = "";
    $("qr").replaceChildren();
    $("secret").textContent = "";
    $("otpauth-link").hidden = true;
    showStep("step-enrol");
    const result = await api("POST", "/api/auth/mfa/setup");
    if (!result.ok) {
      enrolling = false;
      if (result.status === 401) return signedOut(result.data.message);
      showError("enrol", result.data.message);
      return;
    }
    showQr(result.data.qr_svg);
    // Groups of four are easier to type; authenticator apps ignore the spaces.
    $("secret").textContent = (result.data.secret.match(/.{1,4}/g) || []).join(" ");
    if (String(result.data.otpauth_uri).startsWith("otpauth://")) {
      $("otpauth-link").href = result.data.otpauth_uri; // on a phone: opens the app
      $("otpauth-link").hidden = false;
    }
    $("enrol-code").focus();
  }

  /** Put the server-drawn SVG into the page as an element (parsed, never as HTML). */
  function showQr(svg) {
    if (typeof svg !== "string" || !svg) return;
    const doc = new DOMParser().parseFromString(svg, "image/svg+xml");
    const root = doc.documentElement;
    if (!root || root.localName !== "svg" || doc.getElementsByTagName("parsererror").length) {
      return;
    }
    const node = document.importNode(root, true);
    node.setAttribute("role", "img");
    node.setAttribute("aria-label", "认证器绑定二维码 · QR code for your authenticator app");
    $("qr").replaceChildren(node);
  }

  function passwordStep(reason) {
    $("reason-initial").hidden = reason !== "initial";
    $("reason-expired").hidden = reason !== "expired";
    for (const id of ["current-password", "new-password", "new-password-again"]) $(id).value = "";
    showStep("step-password");
  }

  function done(redirect) {
    const goTo = target();
    $("continue").href = goTo;
    const change = new URLSearchParams({ change: "password" });
    if (params.get("next")) change.set("next", goTo);
    $("change-link").href = "/login?" + change.toString();
    $("done-going").hidden = !redirect;
    $("change-link").parentElement.hidden = redirect;
    showStep("step-done");
    if (redirect) window.location.replace(goTo);
  }

  // ------------------------------------------------------------------ forms

  async function onLogin(event) {
    event.preventDefault();
    clearErrors();
    const form = event.currentTarget;
    const username = $("username").value.trim();
    const password = $("password").value;
    if (!username || !password) {
      showError("login", "请输入用户名和口令 · enter your user name and password");
      return;
    }
    setBusy(form, true);
    const result = await api("POST", "/api/auth/login", { username, password });
    setBusy(form, false);
    if (!result.ok) {
      showError("login", result.data.message);
      $("password").value = "";
      $("password").focus();
      return;
    }
    $("password").value = "";
    finishing = true;
    enrolling = false;
    await render(result.data);
  }

  async function onCode(event, step, input) {
    event.preventDefault();
    clearErrors();
    const form = event.currentTarget;
    const code = $(input).value.replace(/\s+/g, "");
    if (!/^[0-9]{6}$/.test(code)) {
      showError(step, "请输入 6 位数字验证码 · enter the 6-digit code");
      return;
    }
    setBusy(form, true);
    const result = await api("POST", "/api/auth/mfa/verify", { code });
    setBusy(form, false);
    if (result.ok) {
      enrolling = false;
      finishing = true;
      await render(result.data);
      return;
    }
    $(input).value = "";
    if (result.status === 401 && result.data.error !== "wrong_code") {
      signedOut(result.data.message); // session ended (e.g. locked after too many codes)
      return;
    }
    showError(step, result.data.message);
    $(input).focus();
  }

  async function onPassword(event) {
    event.preventDefault();
    clearErrors();
    const form = event.currentTarget;
    const current = $("current-password").value;
    const fresh = $("new-password").value;
    if (!current || !fresh) {
      showError("password", "请输入当前口令和新口令 · enter the current and the new password");
      return;
    }
    if (fresh !== $("new-password-again").value) {
      showError("password", "两次输入的新口令不一致 · the two new passwords differ");
      $("new-password-again").value = "";
      $("new-password-again").focus();
      return;
    }
    setBusy(form, true);
    const result = await api("POST", "/api/auth/password", {
      current_password: current,
      new_password: fresh,
    });
    setBusy(form, false);
    if (result.ok) {
      for (const id of ["current-password", "new-password", "new-password-again"]) {
        $(id).value = "";
      }
      finishing = true;
      await render(result.data);
      return;
    }
    if (result.status === 401) {
      signedOut(result.data.message);
      return;
    }
    showError("password", result.data.message);
    $("new-password").value = "";
    $("new-password-again").value = "";
    $(result.data.error === "wrong_current" ? "current-password" : "new-password").focus();
  }

  async function onSignOut(event) {
    event.preventDefault();
    await api("POST", "/api/auth/logout");
    finishing = false;
    signedOut("");
  }

  // ------------------------------------------------------------------ start

  async function start() {
    $("form-login").addEventListener("submit", onLogin);
    $("form-enrol").addEventListener("submit", (e) => onCode(e, "enrol", "enrol-code"));
    $("form-code").addEventListener("submit", (e) => onCode(e, "code", "code"));
    $("form-password").addEventListener("submit", onPassword);
    $("sign-out").addEventListener("click", onSignOut);
    for (const button of document.querySelectorAll("button[type=submit]")) {
      button.disabled = false; // the forms work only with this script (see login.html)
    }
    // The CSRF cookie is readable: without it there is no session, so skip the 401.
    if (!cookieCsrf()) {
      showStep("step-login");
      return;
    }
    const result = await api("GET", "/api/auth/me");
    if (result.ok && result.data.username) {
      await render(result.data);
    } else {
      signedOut("");
    }
  }

  start();
})();
