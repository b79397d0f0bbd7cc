// kdcache dashboard: polls v1/dashboard (same origin; the read token travels as a cookie) and
// redraws the tables. No framework, nothing loaded from elsewhere.
"use strict";
const POLL_MS = 1000;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "?";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(r).padStart(2, "0")}s` : `${r}s`;
}

function ago(now, t) { return t ? `${duration(now - t)} ago` : "-"; }

function fill(table, rows, emptyText, width) {
  const body = table.querySelector("tbody");
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", {colspan: width, class: "empty"}, emptyText))]));
}

function jobRows(data) {
  const rows = [];
  for (const j of data.jobs) {
    const pct = j.rows_total ? Math.round((1000 * j.rows_done) / j.rows_total) / 10 : 0;
    const bar = el("div", {class: "bar", role: "progressbar", "aria-valuenow": pct,
                           "aria-valuemin": 0, "aria-valuemax": 100},
                   el("div", {style: `width:${pct}%`}));
    const cache = j.shards_done > 0
      ? el("a", {href: `v1/caches/${j.cache_id}/report`, class: "report"}, "report")
      : j.cache_id.slice(0, 12);
    const rate = j.tokens_per_s === null ? "?" : Math.round(j.tokens_per_s).toLocaleString();
    const eta = ["pending", "running"].includes(j.status) ? duration(j.eta_s) : "-";
    rows.push(el("tr", {class: `job ${j.status}`, "data-job-id": j.id},
      el("td", {}, el("b", {}, j.name || j.id), el("br"), el("small", {}, j.id)),
      el("td", {class: "status"}, j.status),
      el("td", {}, bar, ` ${pct}% (${j.rows_done}/${j.rows_total} rows)`),
      el("td", {class: "num"}, `${j.shards_done}/${j.shards_total}`),
      el("td", {class: "num tokens-per-s"}, rate),
      el("td", {class: "num eta"}, eta),
      el("td", {}, cache)));
    if (j.error) {
      rows.push(el("tr", {class: "job-error", "data-job-id": j.id},
        el("td", {colspan: 7, class: "error"}, `error: ${j.error}`)));
    }
  }
  return rows;
}

function render(data) {
  fill(document.getElementById("jobs"), jobRows(data), "no jobs yet", 7);
  fill(document.getElementById("workers"), data.workers.map(w => el("tr", {class: "worker"},
    el("td", {}, w.worker), el("td", {class: "num"}, w.active), el("td", {class: "num"}, w.done),
    el("td", {class: "num"}, w.failed), el("td", {}, ago(data.now, w.last_seen)))),
    "no worker has taken a shard yet", 5);
  fill(document.getElementById("leases"), data.leases.map(l => el("tr", {class: "lease"},
    el("td", {}, l.id.slice(0, 10)), el("td", {}, l.job_name || l.job_id), el("td", {class: "num"}, l.shard),
    el("td", {}, l.worker), el("td", {class: "num"}, l.attempt),
    el("td", {}, ago(data.now, l.last_heartbeat)), el("td", {}, duration(l.deadline - data.now)))),
    "no active leases", 7);
  const time = new Date(data.now * 1000).toLocaleTimeString();
  document.getElementById("state").textContent = `updated ${time} · refreshes every ${POLL_MS / 1000}s`;
}

async function poll() {
  try {
    const resp = await fetch("v1/dashboard", {credentials: "same-origin", cache: "no-store"});
    if (resp.status === 401 || resp.status === 403) {
      document.getElementById("main").style.display = "none";
      document.getElementById("login").style.display = "block";
      document.getElementById("state").textContent = "";
      if (resp.status === 403) document.getElementById("login-error").textContent = "that token was refused";
      return;  // no polling until a token is given
    }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
  } catch (err) {
    document.getElementById("state").textContent = `cannot reach the service: ${err.message}; retrying`;
  }
  setTimeout(poll, POLL_MS);
}

poll();
