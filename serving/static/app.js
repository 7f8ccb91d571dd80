// The streamrec demo page: a clickable session and live drift charts.
// Plain DOM and SVG, no dependencies, nothing loaded from elsewhere. Every URL
// is relative to the page, so the page also works behind a path prefix.
"use strict";

const REC_K = 10;
const POPULAR_K = 20;
const TIMELINE_POLL_MS = 3000;
const POPULAR_POLL_MS = 10000;
const APPLY_TIMEOUT_MS = 15000;
const MAX_ENTRIES = 5000;
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

// -- small helpers ---------------------------------------------------------------

function randomHex(bytes) {
  const a = new Uint8Array(bytes);
  crypto.getRandomValues(a);  // also outside secure contexts, unlike randomUUID
  return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "Content-Type": "application/json", ...(options.headers || {}) },
  });
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = text; }
  if (!response.ok) {
    const detail = body && (body.message || (body.detail && (body.detail.message || body.detail)));
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : text}`);
  }
  return body;
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

function clock(tsSeconds) {
  return new Date(tsSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

// -- the session ---------------------------------------------------------------------

const state = { sessionId: null, busy: false, entries: [], lastTs: null };

function newSession() {
  state.sessionId = `web-${randomHex(6)}`;
  sessionStorage.setItem("streamrec-session", state.sessionId);
  $("session-id").value = state.sessionId;
  $("trail").replaceChildren();
  $("status").textContent = "New session: click an item to start it.";
  refreshRecommendations();
}

function itemButton(item, label, note) {
  const li = el("li");
  const button = el("button", { type: "button", class: "item", "data-item": item });
  button.append(el("span", { class: "item-id" }, label));
  if (note) button.append(" ", el("small", {}, note));
  button.addEventListener("click", () => clickItem(item));
  button.disabled = state.busy;
  li.append(button);
  return li;
}

function setBusy(busy) {
  state.busy = busy;
  for (const b of document.querySelectorAll("button.item")) b.disabled = busy;
}

async function clickItem(item) {
  if (state.busy) return;
  setBusy(true);
  const eventId = `web-${randomHex(8)}`;
  const sid = state.sessionId;
  const started = performance.now();
  let sent = false;
  try {
    $("status").textContent = `Sending a click on ${item}…`;
    await api("v1/events", {
      method: "POST",
      body: JSON.stringify({ event_id: eventId, session_id: sid, item_id: item,
                             ts: Date.now(), event_type: "click" }),
    });
    sent = true;
    $("status").textContent = `Click on ${item} sent; waiting for the session updater…`;
    const applied = await waitApplied(sid, eventId);
    if (sid !== state.sessionId) return;  // a new session started meanwhile
    const ms = Math.round(performance.now() - started);
    $("status").textContent = applied
      ? `Click on ${item} applied to the session in ${ms} ms.`
      : `Click on ${item} not in the session after ${APPLY_TIMEOUT_MS / 1000} s: ` +
        "is `streamrec ingest sessions` running?";
    await refreshRecommendations();
  } catch (e) {
    $("status").textContent = sent
      ? `Click on ${item} sent, but the session could not be read: ${e.message}`
      : `Click not sent: ${e.message}`;
  } finally {
    setBusy(false);
  }
}

async function waitApplied(sid, eventId) {
  const deadline = performance.now() + APPLY_TIMEOUT_MS;
  let delay = 100;
  while (performance.now() < deadline) {
    const session = await api(`v1/sessions/${encodeURIComponent(sid)}`);
    if (sid === state.sessionId) renderTrail(session.events);
    if (session.events.some((ev) => ev.event_id === eventId)) return true;
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 1.5, 500);
  }
  return false;
}

function renderTrail(events) {
  $("trail").replaceChildren(...events.map((ev) =>
    el("li", { "data-item": ev.item_id }, `${ev.item_id} (${ev.event_type}, ${clock(ev.ts / 1000)})`)));
}

async function refreshRecommendations() {
  const sid = state.sessionId;
  const started = performance.now();
  try {
    const answer = await api("v1/recommendations", {
      method: "POST", body: JSON.stringify({ session_id: sid, k: REC_K }),
    });
    if (sid !== state.sessionId) return;
    const rtt = Math.round(performance.now() - started);
    const who = answer.model_version
      ? `model ${answer.model_version}`
      : `popularity fallback (${answer.fallback_reason})`;
    const meta = $("recs-meta");
    meta.textContent = `Answered by ${who} in ${fmt(answer.latency_ms, 1)} ms ` +
      `(${rtt} ms round trip).`;
    meta.dataset.modelVersion = answer.model_version || "";
    meta.dataset.fallbackReason = answer.fallback_reason || "";
    $("recs").replaceChildren(...answer.items.map((it) =>
      itemButton(it.item_id, it.item_id, `score ${fmt(it.score, 2)}`)));
  } catch (e) {
    $("recs-meta").textContent = `No recommendations: ${e.message}`;
  }
}

async function refreshPopular() {
  try {
    const got = await api(`v1/items?k=${POPULAR_K}`);
    $("popular").replaceChildren(...got.items.map((it) =>
      itemButton(it.item_id, it.item_id, it.in_model === false ? "new item" : `#${it.rank}`)));
    $("server").textContent = got.model_version
      ? `Serving model ${got.model_version}.`
      : "No model loaded: answers come from popularity.";
    if (!got.items.length) $("server").textContent += " No popular items yet (no clicks ingested).";
  } catch (e) {
    $("server").textContent = `Server unavailable: ${e.message}`;
  }
}

// -- the drift charts ------------------------------------------------------------------

const CHARTS = [
  { id: "quality", fixedMax: 1, series: [
    { key: "hr", label: (k) => `HR@${k}`, cls: "s1" },
    { key: "ndcg", label: (k) => `NDCG@${k}`, cls: "s2" }] },
  { id: "divergence", fixedMax: null, series: [  // PSI is unbounded: a scale of its own
    { key: "psi", label: () => "PSI", cls: "s3" }] },
  { id: "rates", fixedMax: 1, series: [
    { key: "js", label: () => "JS (bits)", cls: "s4" },
    { key: "oov_rate", label: () => "OOV rate", cls: "s5" },
    { key: "session_length_ks", label: () => "session length KS", cls: "s6" }] },
];
const PAD = { left: 44, right: 12, top: 12, bottom: 26 };
const W = 600;
const H = 220;

function svg(tag, attrs, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function drawChart(chart, points, markers) {
  const root = $(`chart-${chart.id}`);
  const nodes = [];
  const t0 = points.length ? points[0].ts : 0;
  const t1 = points.length ? points[points.length - 1].ts : 1;
  const span = Math.max(t1 - t0, 1);
  let ymax = chart.fixedMax;
  if (ymax === null) {
    ymax = 0;
    for (const p of points) for (const s of chart.series) ymax = Math.max(ymax, p[s.key] ?? 0);
    ymax = ymax > 0 ? ymax * 1.1 : 1;
  }
  const x = (t) => PAD.left + ((t - t0) / span) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / ymax) * (H - PAD.top - PAD.bottom);
  for (const frac of [0, 0.5, 1]) {  // grid and y labels
    const v = ymax * frac;
    nodes.push(svg("line", { class: "grid", x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v) }));
    nodes.push(svg("text", { class: "tick", x: PAD.left - 4, y: y(v) + 4, "text-anchor": "end" },
                   fmt(v, 2)));
  }
  if (points.length) {
    nodes.push(svg("text", { class: "tick", x: PAD.left, y: H - 6 }, clock(t0)));
    nodes.push(svg("text", { class: "tick", x: W - PAD.right, y: H - 6, "text-anchor": "end" },
                   clock(t1)));
  }
  for (const m of markers) {  // vertical lines: champion changes and alarms
    if (m.ts < t0 || m.ts > t1) continue;
    const line = svg("line", { class: `marker ${m.kind}`, x1: x(m.ts), x2: x(m.ts),
                               y1: PAD.top, y2: H - PAD.bottom });
    line.append(svg("title", {}, markerText(m)));
    nodes.push(line);
  }
  for (const s of chart.series) {  // one polyline per run of defined values
    let run = [];
    const flush = () => {
      if (run.length > 1) {
        nodes.push(svg("polyline", { class: `series ${s.cls}`, "data-series": s.key,
                                     points: run.join(" ") }));
      }
      run = [];
    };
    for (const p of points) {
      const v = p[s.key];
      if (v === null || v === undefined) { flush(); continue; }
      run.push(`${x(p.ts).toFixed(1)},${y(Math.min(v, ymax)).toFixed(1)}`);
    }
    flush();
    const last = [...points].reverse().find((p) => p[s.key] !== null && p[s.key] !== undefined);
    if (last) {
      nodes.push(svg("circle", { class: `dot ${s.cls}`, "data-series": s.key, r: 3,
                                 cx: x(last.ts), cy: y(Math.min(last[s.key], ymax)) }));
    }
  }
  root.replaceChildren(...nodes);
  const latest = points.length ? points[points.length - 1] : null;
  $(`legend-${chart.id}`).replaceChildren(...chart.series.map((s) => {
    const item = el("span", { class: `legend-item ${s.cls}`, "data-series": s.key });
    item.append(el("span", { class: "swatch" }), `${s.label(latest ? latest.k : "k")} `,
                el("strong", {}, fmt(latest ? latest[s.key] : null)));
    return item;
  }));
}

function markerText(m) {
  if (m.kind === "champion") {
    return `${clock(m.ts)} new champion ${m.model_version}` +
      (m.previous ? ` (was ${m.previous})` : "");
  }
  const a = m.alarm;
  return `${clock(m.ts)} alarm ${a.detector} = ${fmt(a.statistic)} > ${fmt(a.threshold)} ` +
    `(model ${a.model_version}, ${a.samples} samples)`;
}

function renderDrift() {
  const points = state.entries.filter((e) => e.kind === "point");
  const markers = state.entries.filter((e) => e.kind !== "point");
  for (const chart of CHARTS) drawChart(chart, points, markers);
  $("markers").replaceChildren(...markers.slice(-50).reverse().map((m) =>
    el("li", { class: m.kind }, markerText(m))));
  const latest = points[points.length - 1];
  if (!latest) {
    $("drift-status").textContent = "No drift timeline yet: is `streamrec monitor` running?";
    return;
  }
  const alarms = (latest.alarms || []).map((a) => a.detector);
  $("drift-status").textContent = `Champion ${latest.model_version ?? "none"}; ` +
    `${latest.scored} clicks scored, ${latest.hits} hits; ` +
    (alarms.length ? `alarms holding: ${alarms.join(", ")}.` : "no alarm holding.") +
    ` Updated ${clock(latest.ts)}.`;
}

async function pollTimeline() {
  try {
    const query = state.lastTs === null ? "limit=2000" : `since=${state.lastTs}`;
    const got = await api(`v1/timeline?${query}`);
    if (got.entries.length) {
      state.entries = state.entries.concat(got.entries).slice(-MAX_ENTRIES);
      state.lastTs = state.entries[state.entries.length - 1].ts;
    }
    renderDrift();
  } catch (e) {
    $("drift-status").textContent = `Timeline unavailable: ${e.message}`;
  } finally {
    setTimeout(pollTimeline, TIMELINE_POLL_MS);
  }
}

async function pollPopular() {
  await refreshPopular();
  setTimeout(pollPopular, POPULAR_POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("new-session").addEventListener("click", newSession);
  const saved = sessionStorage.getItem("streamrec-session");
  if (saved) {
    state.sessionId = saved;
    $("session-id").value = saved;
    api(`v1/sessions/${encodeURIComponent(saved)}`).then((s) => renderTrail(s.events))
      .catch(() => {});
    refreshRecommendations();
  } else {
    newSession();
  }
  pollPopular();
  pollTimeline();
});
