// The bmojo dashboard: polls /api/v1/status every second and draws it.
// Plain JS, no dependencies; charts are drawn on <canvas> by hand.
"use strict";

(function () {
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    sessionStorage.setItem("bmojo-token", params.get("token"));
    params.delete("token");
    const q = params.toString();
    history.replaceState(null, "", location.pathname + (q ? "?" + q : ""));
  }
})();

const $ = (id) => document.getElementById(id);

function fmt(x, digits) {
  if (x === null || x === undefined || !isFinite(x)) return "–";
  return x.toFixed(digits);
}

function fmtInt(x) {
  return Math.round(x).toLocaleString("en-US");
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (h > 0) return h + "h" + String(m).padStart(2, "0") + "m";
  if (m > 0) return m + "m" + String(sec).padStart(2, "0") + "s";
  return sec + "s";
}

function esc(s) {
  return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

// drawChart draws series [{points:[{step,value}], color, dots}] with axes.
function drawChart(canvas, series, opts) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, w, h);
  const all = series.flatMap((s) => s.points);
  canvas.dataset.points = String(series.length ? series[0].points.length : 0);
  const pad = { l: 56, r: 12, t: 10, b: 26 };
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7385";
  if (all.length === 0) {
    ctx.fillText("waiting for data…", pad.l, h / 2);
    return;
  }
  let x0 = Math.min(...all.map((p) => p.step)), x1 = Math.max(...all.map((p) => p.step));
  let y0 = Math.min(...all.map((p) => p.value)), y1 = Math.max(...all.map((p) => p.value));
  if (opts && opts.zero) y0 = Math.min(0, y0);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y1 += Math.abs(y1) * 0.05 + 1e-6; y0 -= Math.abs(y0) * 0.05 + 1e-6; }
  const m = (y1 - y0) * 0.05;
  y1 += m;
  if (!(opts && opts.zero)) y0 -= m;
  const X = (s) => pad.l + ((s - x0) / (x1 - x0)) * (w - pad.l - pad.r);
  const Y = (v) => pad.t + (1 - (v - y0) / (y1 - y0)) * (h - pad.t - pad.b);
  ctx.strokeStyle = "#e3e6eb";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4, y = Y(v);
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(w - pad.r, y); ctx.stroke();
    ctx.fillText(Math.abs(y1 - y0) >= 20 ? fmtInt(v) : v.toFixed(2), pad.l - 6, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (let i = 0; i <= 4; i++) {
    const s = x0 + ((x1 - x0) * i) / 4;
    ctx.fillText(String(Math.round(s)), X(s), h - pad.b + 6);
  }
  for (const s of series) {
    if (!s.points.length) continue;
    ctx.strokeStyle = s.color;
    ctx.fillStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    s.points.forEach((p, i) => (i ? ctx.lineTo(X(p.step), Y(p.value)) : ctx.moveTo(X(p.step), Y(p.value))));
    ctx.stroke();
    if (s.dots) {
      for (const p of s.points) { ctx.beginPath(); ctx.arc(X(p.step), Y(p.value), 3.5, 0, 2 * Math.PI); ctx.fill(); }
    }
  }
}

function render(s) {
  $("job").textContent = s.job;
  document.title = "bmojo " + s.job + " — step " + s.step + "/" + s.steps;
  const pct = Math.round(s.progress * 1000) / 10;
  $("bar").style.width = pct + "%";
  $("bar").classList.toggle("done", s.done);
  $("bartext").textContent = s.done ? "done: " + s.step + " steps" : pct + "%  (" + s.step + " / " + s.steps + ")";
  $("step").textContent = s.step + " / " + s.steps;
  $("eta").textContent = s.done ? "done" : fmtDuration(s.eta_seconds);
  $("loss").textContent = fmt(s.loss, 4);
  $("valloss").textContent = s.val_loss ? fmt(s.val_loss, 4) : "–";
  $("tps").textContent = fmtInt(s.tokens_per_s);
  $("epoch").textContent = s.epoch;
  $("ring").textContent = s.ring_size + (s.ring_size === 1 ? " worker" : " workers");
  $("recovery").textContent = s.last_recovery_seconds ? fmt(s.last_recovery_seconds, 2) + " s" : "–";
  $("ckpt").textContent = s.checkpoint ? "step " + s.checkpoint.step : "–";
  $("ckpt").title = s.checkpoint ? s.checkpoint.dir : "";

  const css = getComputedStyle(document.documentElement);
  drawChart($("losschart"), [
    { points: s.loss_history, color: css.getPropertyValue("--train").trim() },
    { points: s.val_loss_history, color: css.getPropertyValue("--val").trim(), dots: true },
  ]);
  drawChart($("tpschart"), [{ points: s.tokens_per_s_history, color: css.getPropertyValue("--ok").trim() }], { zero: true });

  const rows = s.workers.map((w) => {
    const cls = [w.state, w.straggler ? "straggler" : ""].join(" ");
    const num = (x, d) => '<td class="num">' + (w.updated ? fmt(x, d) : "–") + "</td>";
    return '<tr class="' + cls + '" data-worker="' + esc(w.id) + '" data-state="' + w.state + '">' +
      "<td>" + esc(w.id) + (w.straggler ? '<span class="tag" title="the others wait for it in the all-reduce">straggler</span>' : "") + "</td>" +
      '<td class="num">' + (w.rank >= 0 ? w.rank : "–") + "</td>" +
      '<td><span class="state ' + w.state + '" title="' + esc(w.reason || "") + '">' + w.state + "</span></td>" +
      "<td>" + esc(w.device || "") + "</td><td>" + esc(w.endpoint || "") + "</td>" +
      '<td class="num">' + (w.updated ? w.last_step : "–") + "</td>" +
      num(w.step_seconds, 3) + num(w.data_seconds, 3) + num(w.compute_seconds, 3) +
      num(w.allreduce_wait_seconds, 3) + num(w.optimizer_seconds, 3) +
      '<td class="num">' + (w.updated ? fmtInt(w.tokens_per_s) : "–") + "</td>" +
      num(w.grad_norm, 3) + num(w.last_checkpoint_seconds, 2) +
      '<td class="num">' + (w.ring_arrival_seconds != null ? fmt(w.ring_arrival_seconds, 3) : "–") + "</td>" +
      "<td>" + (w.gpu ? Math.round(w.gpu.util_percent) + "% · " + fmt(w.gpu.mem_used_bytes / 2 ** 30, 1) + " GiB · " +
        Math.round(w.gpu.power_watts) + " W · " + Math.round(w.gpu.temp_celsius) + " °C" : "–") + "</td></tr>";
  });
  $("workers").tBodies[0].innerHTML = rows.join("");

  const evs = s.events.slice().reverse();
  $("events").tBodies[0].innerHTML = evs.map((e) => {
    const t = new Date(e.time * 1000).toLocaleTimeString("en-GB");
    const reason = e.reason + (e.recovery_seconds ? " (recovery " + e.recovery_seconds.toFixed(2) + " s)" : "");
    return '<tr data-kind="' + esc(e.kind) + '" data-worker="' + esc(e.worker_id || "") + '"><td>' + t +
      '</td><td class="kind-' + esc(e.kind) + '">' + esc(e.kind) + "</td><td>" + esc(e.worker_id || "") +
      "</td><td>" + e.epoch + "</td><td>" + esc(reason) + "</td></tr>";
  }).join("");
}

function setConn(text, err) {
  $("conn").textContent = text;
  $("conn").classList.toggle("err", !!err);
}

async function poll() {
  const headers = {};
  const token = sessionStorage.getItem("bmojo-token");
  if (token) headers["Authorization"] = "Bearer " + token;
  try {
    const r = await fetch("api/v1/status", { headers, cache: "no-store" });
    const body = await r.json().catch(() => ({ error: "HTTP " + r.status }));
    if (r.status === 401) {
      $("auth").hidden = false;
      setConn(body.error, true);
    } else if (!r.ok) {
      setConn(body.error || "HTTP " + r.status, true);
    } else {
      $("auth").hidden = true;
      render(body);
      setConn("updated " + new Date().toLocaleTimeString("en-GB") + (body.done ? " — job done" : ""));
    }
  } catch (e) {
    setConn("cannot reach the monitor: " + e.message + " (retrying)", true);
  }
  setTimeout(poll, 1000);
}

$("authform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("bmojo-token", $("tokeninput").value);
  $("tokeninput").value = "";
});

poll();
