// The patient's entry from a report QR code, a registration label or an SMS link
// (/m/e/<token>): identity check, then this exam's progress and released report. It talks
// only to /api/portal/*; the session lives in this tab (sessionStorage) for 30 minutes.
// Served as a file because the page's CSP allows no inline script.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const token = decodeURIComponent(window.location.pathname.split("/").pop() || "");
  const key = "cf-portal-" + token;

  function notice(text) {
    $("notice").textContent = text;
    $("notice").hidden = !text;
  }

  async function api(path, options = {}) {
    const session = sessionStorage.getItem(key);
    const headers = { Accept: "application/json", ...(options.headers || {}) };
    if (session) headers.Authorization = "Bearer " + session;
    const response = await fetch("/api/portal" + path, { ...options, headers });
    if (response.status === 401) sessionStorage.removeItem(key);
    return response;
  }

  async function message(response) {
    try {
      const body = await response.json();
      return body.message || body.error || response.statusText;
    } catch (_err) {
      return response.statusText;
    }
  }

  function showExam(exam) {
    $("step-verify").hidden = true;
    $("step-exam").hidden = false;
    $("exam-name").textContent = exam.exam || "影像检查";
    $("accession").textContent = exam.accession_number ? "检查号 " + exam.accession_number : "";
    for (const item of document.querySelectorAll("#steps li")) {
      item.classList.toggle("done", Boolean(exam.steps[item.dataset.step]));
    }
    const report = exam.report;
    $("report").hidden = !report;
    $("waiting").hidden = Boolean(report);
    if (report) {
      $("findings").textContent = report.findings || "";
      $("impression").textContent = report.impression || "";
      const who = [report.reporting_doctor && "报告医生 " + report.reporting_doctor,
                   report.reviewing_doctor && "审核医生 " + report.reviewing_doctor];
      $("doctors").textContent = who.filter(Boolean).join("　");
    }
  }

  async function loadExam() {
    const response = await api("/exam");
    if (response.ok) {
      showExam(await response.json());
      return true;
    }
    return false;
  }

  async function start() {
    const entry = await api("/entry/" + encodeURIComponent(token));
    if (!entry.ok) {
      notice(await message(entry));
      return;
    }
    const info = await entry.json();
    $("hospital").textContent = info.hospital || "云胶片 · Cloud Film";
    if (sessionStorage.getItem(key) && (await loadExam())) return;
    $("masked").textContent = info.name || "患者";
    $("step-verify").hidden = false;
    if (info.locked) notice("验证失败次数过多，请 15 分钟后再试 · too many failed checks: try again later");
    if (!info.methods.includes("id-card")) {
      notice("该检查暂不能在线验证，请联系医院 · this exam cannot be verified online: please ask the hospital");
      $("verify-button").disabled = true;
    }
  }

  $("form-verify").addEventListener("submit", async (event) => {
    event.preventDefault();
    notice("");
    $("verify-button").disabled = true;
    try {
      const response = await api("/entry/" + encodeURIComponent(token) + "/verify", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ name: $("name").value.trim(), id_number: $("id-number").value.trim() }),
      });
      if (!response.ok) {
        notice(await message(response));
        return;
      }
      sessionStorage.setItem(key, (await response.json()).session);
      $("id-number").value = "";
      await loadExam();
    } finally {
      $("verify-button").disabled = false;
    }
  });

  $("pdf-button").addEventListener("click", async () => {
    const response = await api("/exam/report.pdf");
    if (!response.ok) {
      notice(await message(response));
      return;
    }
    const url = URL.createObjectURL(await response.blob());
    window.location.assign(url);
  });

  start();
})();
