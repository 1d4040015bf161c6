// The FIRST dashboard: reads the same JSON routes a script would, with the session cookie the
// sign-in set (HttpOnly: never read here). No token is ever in this page, localStorage or a URL.
"use strict";

(function () {
  const state = { session: null, charts: {}, requestsAfter: null, logAfter: null, pending: null };
  const PALETTE = ["#1f5fa8", "#d9730d", "#2e8540", "#a4262c", "#6b4fbb", "#00838f", "#8a6d00"];

  function $(id) { return document.getElementById(id); }

  function fmt(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"); }

  function when(seconds) {
    return seconds ? new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) : "–";
  }

  async function api(path, options) {
    const init = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
    if (init.method && init.method !== "GET") init.headers["X-FIRST-CSRF"] = state.session.csrf_token;
    const response = await fetch(path, init);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const message = (body.error && body.error.message) || response.statusText;
      throw new Error(message);
    }
    return body;
  }

  function showError(error) {
    const box = $("error");
    box.textContent = String(error.message || error);
    box.hidden = false;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      const td = document.createElement("td");
      if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell;
      tr.appendChild(td);
    }
    return tr;
  }

  function fill(tableId, rows, emptyText) {
    const body = $(tableId).querySelector("tbody");
    body.replaceChildren(...rows);
    if (!rows.length) {
      const tr = row([emptyText || "Nothing yet."]);
      tr.firstChild.colSpan = $(tableId).querySelectorAll("thead th").length;
      body.appendChild(tr);
    }
  }

  function chart(id, config) {
    if (state.charts[id]) state.charts[id].destroy();
    config.options = Object.assign({ responsive: true, maintainAspectRatio: false, animation: false }, config.options || {});
    state.charts[id] = new window.Chart($(id), config);
    return state.charts[id];
  }

  function progress(done, total) {
    const bar = document.createElement("progress");
    bar.max = Math.max(total, 1);
    bar.value = done;
    bar.textContent = `${done} of ${total}`;
    bar.setAttribute("aria-label", `${done} of ${total} lines`);
    const wrap = document.createElement("span");
    wrap.append(bar, ` ${done}/${total}`);
    return wrap;
  }

  function link(text, href) {
    const a = document.createElement("a");
    a.textContent = text;
    a.href = href;
    return a;
  }

  // ---- every user ---------------------------------------------------------------------------

  async function loadUsage() {
    const usage = await api("v1/usage");
    // Every day of the report, so a quiet day is a gap at zero rather than missing.
    const days = [];
    for (let t = Date.parse(usage.start_date); t <= Date.parse(usage.end_date); t += 86400000) {
      days.push(new Date(t).toISOString().slice(0, 10));
    }
    const models = [...new Set(usage.data.map((d) => d.model))].sort();
    const cell = (day, model, key) =>
      usage.data.filter((d) => d.date === day && (!model || d.model === model)).reduce((s, d) => s + d[key], 0);
    $("usage-requests").textContent = fmt(usage.data.reduce((s, d) => s + d.requests, 0));
    $("usage-tokens").textContent = fmt(usage.data.reduce((s, d) => s + d.total_tokens, 0));
    chart("usage-chart", {
      data: {
        labels: days,
        datasets: [
          ...models.map((model, i) => ({
            type: "bar", label: `${model} tokens`, stack: "tokens", yAxisID: "tokens",
            backgroundColor: PALETTE[i % PALETTE.length], data: days.map((day) => cell(day, model, "total_tokens")),
          })),
          { type: "line", label: "requests", yAxisID: "requests", borderColor: "#222", backgroundColor: "#222", pointRadius: 3,
            data: days.map((day) => cell(day, null, "requests")) },
        ],
      },
      options: { scales: {
        tokens: { type: "linear", position: "left", stacked: true, beginAtZero: true, title: { display: true, text: "tokens" } },
        requests: { type: "linear", position: "right", beginAtZero: true, ticks: { precision: 0 }, grid: { drawOnChartArea: false }, title: { display: true, text: "requests" } },
        x: { stacked: true },
      } },
    });
    fill("usage-table", usage.data.map((d) =>
      row([d.date, d.model, fmt(d.requests), fmt(d.prompt_tokens), fmt(d.completion_tokens), fmt(d.total_tokens)])),
      "No usage in the last 30 days.");
  }

  async function loadRequests(more) {
    const query = more && state.requestsAfter ? `?limit=20&after=${encodeURIComponent(state.requestsAfter)}` : "?limit=20";
    const page = await api(`v1/requests${query}`);
    const rows = page.data.map((r) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "linkish";
      button.textContent = r.id;
      button.addEventListener("click", () => showRequest(r.id));
      return row([button, r.status, r.model, r.cluster, fmt(r.latency_ms), fmt(r.usage.total_tokens), when(r.created_at)]);
    });
    const body = $("requests-table").querySelector("tbody");
    if (more) body.append(...rows); else fill("requests-table", rows, "No requests yet.");
    state.requestsAfter = page.last_id;
    $("requests-more").hidden = !page.has_more;
  }

  async function showRequest(id) {
    const detail = await api(`v1/requests/${encodeURIComponent(id)}`);
    $("request-detail-id").textContent = id;
    $("request-detail-body").textContent = JSON.stringify(detail, null, 2);
    $("request-detail").hidden = false;
    $("request-detail").scrollIntoView();
  }

  async function loadBatches() {
    const [batches, files] = await Promise.all([api("v1/batches?limit=50"), api("v1/files?limit=100")]);
    fill("batches-table", batches.data.map((b) => {
      const counts = b.request_counts || { total: 0, completed: 0, failed: 0 };
      const output = b.output_file_id ? link("download", `v1/files/${encodeURIComponent(b.output_file_id)}/content`) : "–";
      return row([b.id, b.status, b.model || "–", progress(counts.completed + counts.failed, counts.total), output]);
    }), "No batches.");
    fill("files-table", files.data.map((f) =>
      row([f.id, f.filename, f.purpose, fmt(f.bytes), link("download", `v1/files/${encodeURIComponent(f.id)}/content`)])),
      "No files.");
  }

  async function loadModels() {
    const [models, status] = await Promise.all([api("v1/models"), api("resource_server/v1/status")]);
    fill("models-table", models.data.map((m) =>
      row([m.id, Object.entries(m.states).map(([c, s]) => `${c}: ${s}`).join(", ")])), "No models.");
    fill("clusters-table", Object.entries(status.clusters).map(([name, c]) =>
      row([name, c.status, fmt(c.free_nodes), Object.entries(c.models).filter(([, n]) => n).map(([s, n]) => `${n} ${s}`).join(", ") || "–"])));
  }

  // ---- admins -------------------------------------------------------------------------------

  async function loadAdmin() {
    const hours = $("admin-hours").value;
    const [activity, status, models] = await Promise.all([
      api(`v1/admin/activity?hours=${hours}`), api("resource_server/v1/status"), api("v1/models"),
    ]);
    $("kpi-rpm").textContent = fmt(activity.live.requests_per_minute);
    $("kpi-tpm").textContent = fmt(activity.live.tokens_per_minute);
    $("kpi-open").textContent = fmt(activity.live.open_requests);
    $("kpi-requests").textContent = fmt(activity.totals.requests);
    $("kpi-errors").textContent = `${(activity.outcomes.error_rate * 100).toFixed(1)}%`;
    $("kpi-cancels").textContent = `${(activity.outcomes.cancel_rate * 100).toFixed(1)}%`;
    renderRefusals(activity.refusals);
    const series = Object.entries(activity.series.models);
    chart("admin-series", {
      type: "line",
      data: { labels: activity.series.labels, datasets: series.map(([model, s], i) => ({
        label: model, data: s.requests, borderColor: PALETTE[i % PALETTE.length], backgroundColor: PALETTE[i % PALETTE.length] })) },
      options: { scales: { y: { beginAtZero: true, title: { display: true, text: "requests" } } } },
    });
    fill("admin-models", activity.models.map((m) => row([m.model, fmt(m.requests), fmt(m.tokens), fmt(m.users), fmt(m.errors),
      fmt(m.latency_ms.p50), fmt(m.latency_ms.p90), fmt(m.latency_ms.p99)])), "No requests in this window.");
    const buckets = activity.models.length ? activity.models[0].latency_ms.buckets : [];
    chart("admin-latency", {
      type: "bar",
      data: { labels: [...buckets.map((b) => `≤${b}`), `>${buckets[buckets.length - 1] || 0}`],
        datasets: activity.models.map((m, i) => ({ label: m.model, data: m.latency_ms.histogram, backgroundColor: PALETTE[i % PALETTE.length] })) },
      options: { scales: { y: { beginAtZero: true, title: { display: true, text: "requests" } }, x: { title: { display: true, text: "latency (ms)" } } } },
    });
    chart("admin-users-chart", {
      type: "bar",
      data: { labels: activity.users.map((u) => u.username), datasets: [{ label: "requests", data: activity.users.map((u) => u.requests), backgroundColor: PALETTE[0] }] },
      options: { indexAxis: "y", scales: { x: { beginAtZero: true } } },
    });
    fill("admin-users", activity.users.map((u) => row([u.username, fmt(u.requests), fmt(u.tokens)])), "No users in this window.");
    renderClusters(status, models);
    const counts = Object.entries(activity.batches.by_status).map(([s, n]) => `${n} ${s}`).join(", ");
    $("admin-batch-counts").textContent = counts ? `Batches: ${counts}.` : "No batches.";
    fill("admin-batches", activity.batches.recent.map((b) =>
      row([b.id, b.username, b.model, b.status, progress(b.completed + b.failed, b.total)])), "No batches.");
    await loadLog(false);
  }

  function renderRefusals(refusals) {
    if (!refusals.available) {
      $("kpi-refusals").textContent = "–";
      $("refusals-note").textContent = "The gateway's metrics cannot be read here (locally: first-gateway dev --metrics).";
      fill("admin-refusals", [], "No metrics.");
      return;
    }
    $("kpi-refusals").textContent = `${(refusals.refusal_rate * 100).toFixed(1)}%`;
    $("refusals-note").textContent = `${fmt(refusals.refused)} refused in the window; inference requests by outcome: ` +
      (Object.entries(refusals.requests_by_outcome).map(([o, n]) => `${n} ${o}`).join(", ") || "none") + ".";
    fill("admin-refusals", [
      ...Object.entries(refusals.by_status).map(([s, n]) => row([`HTTP ${s}`, fmt(n)])),
      ...Object.entries(refusals.by_code).map(([c, n]) => row([c, fmt(n)])),
    ], "No refusals in this window.");
  }

  function renderClusters(status, models) {
    fill("admin-clusters", Object.entries(status.clusters).map(([name, c]) => {
      const states = models.data.filter((m) => m.states[name]).map((m) => `${m.id}: ${m.states[name]}`).join("; ");
      const on = c.status === "maintenance";
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.cluster = name;
      button.textContent = on ? `Take ${name} out of maintenance` : `Put ${name} in maintenance`;
      button.addEventListener("click", () => askMaintenance(name, !on));
      return row([name, c.status, fmt(c.free_nodes), states || "–", button]);
    }));
  }

  function askMaintenance(cluster, on) {
    state.pending = { cluster, on };
    $("confirm-text").textContent = on
      ? `Put ${cluster} in maintenance? No new request will be routed to it.`
      : `Take ${cluster} out of maintenance? Requests will be routed to it again.`;
    $("confirm").hidden = false;
    $("confirm-yes").focus();
  }

  async function confirmMaintenance() {
    const { cluster, on } = state.pending;
    $("confirm").hidden = true;
    const switched = await api(`v1/admin/clusters/${encodeURIComponent(cluster)}/maintenance`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ maintenance: on }),
    });
    const [status, models] = await Promise.all([api("resource_server/v1/status"), api("v1/models")]);
    // The switch's own answer: a health poll that was under way may still write the old status
    // once (the next poll keeps the switch).
    if (status.clusters[cluster]) status.clusters[cluster].status = switched.status;
    renderClusters(status, models);
  }

  async function loadLog(more) {
    const form = new FormData($("log-filters"));
    const params = new URLSearchParams({ hours: $("admin-hours").value, limit: "50" });
    for (const [key, value] of form.entries()) if (value) params.set(key, value);
    if (more && state.logAfter) params.set("after", state.logAfter);
    const page = await api(`v1/admin/requests?${params}`);
    const rows = page.data.map((r) => row([r.id, r.username, r.model, r.cluster, r.status, fmt(r.latency_ms), fmt(r.total_tokens), when(r.created_at)]));
    if (more) $("admin-log").querySelector("tbody").append(...rows); else fill("admin-log", rows, "No requests match.");
    state.logAfter = page.last_id;
    $("log-more").hidden = !page.has_more;
  }

  // ---- views --------------------------------------------------------------------------------

  const loaders = { usage: loadUsage, requests: () => loadRequests(false), batches: loadBatches, models: loadModels, admin: loadAdmin };

  async function show() {
    let view = (location.hash || "#usage").slice(1);
    if (!loaders[view] || (view === "admin" && !state.session.is_admin)) view = "usage";
    for (const section of document.querySelectorAll("main > section[data-view]")) section.hidden = section.dataset.view !== view;
    for (const a of document.querySelectorAll("#tabs a")) {
      if (a.dataset.view === view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    }
    $("error").hidden = true;
    document.body.dataset.loaded = "";
    try {
      await loaders[view]();
    } catch (error) {
      showError(error);
    }
    document.body.dataset.loaded = view;
  }

  async function start() {
    try {
      state.session = await api("dashboard/session");
    } catch (error) {
      location.assign("dashboard/login");
      return;
    }
    const s = state.session;
    $("who").textContent = `${s.name || s.username} (${s.username})${s.is_admin ? " · admin" : ""}`;
    for (const item of document.querySelectorAll(".admin-only")) item.hidden = !s.is_admin;
    $("signout").addEventListener("click", async () => {
      await api("dashboard/logout", { method: "POST" });
      $("who").textContent = "Signed out.";
      document.querySelector("main").replaceChildren();
    });
    $("requests-more").addEventListener("click", () => loadRequests(true).catch(showError));
    $("log-more").addEventListener("click", () => loadLog(true).catch(showError));
    $("admin-hours").addEventListener("change", () => loadAdmin().catch(showError));
    $("log-filters").addEventListener("submit", (event) => { event.preventDefault(); loadLog(false).catch(showError); });
    $("confirm-yes").addEventListener("click", () => confirmMaintenance().catch(showError));
    $("confirm-no").addEventListener("click", () => { $("confirm").hidden = true; state.pending = null; });
    window.addEventListener("hashchange", show);
    await show();
  }

  // For tests and the curious: the charts as drawn.
  window.firstDashboard = state;
  document.addEventListener("DOMContentLoaded", start);
})();
