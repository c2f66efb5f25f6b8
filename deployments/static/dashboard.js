// AuraLink operator dashboard: polls /dashboard/api/stats once a second, draws the bitrate
// graph on a plain canvas, and toggles AI compression per user. Nothing loads from elsewhere.
"use strict";
(function () {
  const HISTORY = 120; // points kept on the graph (one per poll)
  const points = []; // {t, sent, native}
  const pinned = new Set(); // users looked up by id, kept in the table
  const desired = new Map(); // user -> AI wanted, until a snapshot from the bridge agrees
  let token = null;

  function readToken() {
    const m = /(?:^|[#&])token=([^&]+)/.exec(window.location.hash || "");
    if (m) {
      token = decodeURIComponent(m[1]);
      sessionStorage.setItem("auralink-token", token);
      history.replaceState(null, "", window.location.pathname); // keep it out of the address bar
    } else {
      token = sessionStorage.getItem("auralink-token");
    }
    if (!token) {
      token = window.prompt("Operator token (auralink token --scope operator --stream '*')") || "";
      sessionStorage.setItem("auralink-token", token);
    }
  }

  async function api(path, options) {
    const opts = Object.assign({ headers: {} }, options || {});
    opts.headers["Authorization"] = "Bearer " + token;
    const res = await fetch("api/" + path, opts);
    if (!res.ok) {
      const text = await res.text();
      throw new Error(res.status + " " + text);
    }
    return res.json();
  }

  function setStatus(text, ok) {
    const el = document.getElementById("status");
    el.textContent = text;
    el.className = "status " + (ok ? "ok" : "err");
  }

  function fmt(n, digits) { return Number(n || 0).toLocaleString(undefined, { maximumFractionDigits: digits || 0 }); }

  // The graph's y axis: at most `target` steps of 1, 2, 2.5 or 5 x 10^k from 0 to the first
  // step at or above `maxKbps`, in kb/s below 1 Mb/s and in Mb/s above, with as many decimals
  // as the step needs, so no two labels are the same. -> {top (kb/s), ticks: [{kbps, label}]}
  function axisTicks(maxKbps, target) {
    target = target || 4;
    function nice(span) { // -> [step, steps]
      const raw = span / target;
      const mag = Math.pow(10, Math.floor(Math.log10(raw)));
      const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw * (1 - 1e-9));
      return [step, Math.max(1, Math.ceil(span / step - 1e-9))];
    }
    let scale = 1, unit = "kb/s";
    let [step, n] = nice(Math.max(maxKbps, 1));
    if (n * step >= 1000) { // the top label would read 1,000 kb/s or more: use Mb/s
      scale = 1000; unit = "Mb/s";
      [step, n] = nice(maxKbps / scale);
    }
    let digits = 0;
    while (digits < 6 && Math.abs(Math.round(step * Math.pow(10, digits)) - step * Math.pow(10, digits)) > 1e-6) digits++;
    const ticks = [];
    for (let i = 0; i <= n; i++) {
      const v = i * step;
      const text = i === 0 ? "0" : v.toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits });
      ticks.push({ kbps: v * scale, label: text + " " + unit });
    }
    return { top: n * step * scale, ticks: ticks };
  }
  window.AuralinkDashboard = Object.freeze({ axisTicks: axisTicks });

  function draw() {
    const c = document.getElementById("graph");
    const ctx = c.getContext("2d");
    const w = c.width, h = c.height, pad = 40;
    ctx.clearRect(0, 0, w, h);
    ctx.strokeStyle = "#e3e7ec"; ctx.fillStyle = "#5b6675"; ctx.font = "11px sans-serif";
    let peak = 1;
    for (const p of points) peak = Math.max(peak, p.sent, p.native);
    const axis = axisTicks(peak * 1.05);
    const max = axis.top;
    for (const t of axis.ticks) {
      const y = h - pad / 2 - (h - pad) * t.kbps / max;
      ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w - 8, y); ctx.stroke();
      ctx.fillText(t.label, 0, y - 2);
    }
    c.dataset.ticks = JSON.stringify(axis.ticks.map(t => t.label));
    function line(key, color) {
      ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath();
      points.forEach((p, i) => {
        const x = pad + (w - pad - 8) * i / Math.max(1, HISTORY - 1);
        const y = h - pad / 2 - (h - pad) * p[key] / max;
        if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke(); ctx.lineWidth = 1;
    }
    line("native", "#fb8c00");
    line("sent", "#1e88e5");
    c.dataset.points = String(points.length);
    document.getElementById("points").textContent = points.length + " points";
  }

  function renderReasons(reasons) {
    const body = document.querySelector("#reasons tbody");
    body.innerHTML = "";
    const keys = Object.keys(reasons || {}).sort();
    if (!keys.length) { body.innerHTML = '<tr><td class="muted">no fallback</td></tr>'; return; }
    for (const k of keys) {
      const tr = document.createElement("tr");
      tr.innerHTML = "<td></td><td></td>";
      tr.children[0].textContent = k; tr.children[1].textContent = fmt(reasons[k]);
      body.appendChild(tr);
    }
  }

  function renderUsers(users) {
    const body = document.querySelector("#users tbody");
    const rows = users.slice(0, 40);
    for (const u of pinned) if (!rows.some(r => r.user === u)) {
      const found = users.find(r => r.user === u);
      rows.unshift(found || { user: u, stream: null, live: false, ai_enabled: null });
    }
    body.innerHTML = "";
    for (const u of rows) {
      const tr = document.createElement("tr");
      tr.dataset.user = u.user;
      const s = aiState(u);
      tr.innerHTML = '<td class="user"></td><td class="stream"></td><td class="state"></td>' +
        '<td><label><input type="checkbox" class="ai-toggle"> AI compression</label></td>';
      tr.querySelector(".user").textContent = u.user;
      tr.querySelector(".stream").textContent = u.stream || "-";
      const st = tr.querySelector(".state");
      st.textContent = s.text;
      st.className = "state " + (s.state === "on" ? "state-on" : "state-off");
      st.dataset.state = s.state;
      st.dataset.bridge = u.bridge_state || ""; // what the media path applies (up to ~1 s behind)
      if (u.ai_state_from === "bridge") st.title = "the supervisor did not answer: what the bridge applies";
      else if (u.bridge_state && u.bridge_state !== s.state && s.state !== "offline") st.title = "the bridge still applies: " + u.bridge_state;
      const box = tr.querySelector(".ai-toggle");
      const known = u.ai_enabled !== false;
      if (desired.has(u.user) && desired.get(u.user) === known) desired.delete(u.user);
      box.checked = desired.has(u.user) ? desired.get(u.user) : known;
      box.setAttribute("aria-label", "AI compression for " + u.user);
      box.addEventListener("change", () => toggle(u.user, box.checked, box));
      body.appendChild(tr);
    }
  }

  // The supervisor's decision for a live user's stream (the bridge's, if it did not answer).
  function aiState(u) {
    if (!u.live) return { state: "offline", text: "offline" };
    const state = u.ai_state || (u.bridge_opted_out ? "opted_out" : "on");
    if (state === "opted_out") return { state: state, text: "AI off (opted out)" };
    if (state === "unhealthy") {
      const until = u.ai_off_until ? " until " + new Date(u.ai_off_until * 1000).toLocaleTimeString() : "";
      return { state: state, text: "AI off (unhealthy)" + until };
    }
    return { state: "on", text: "AI on" };
  }

  // Per stream: the publisher's requested bandwidth (and the operator's cap), the depth the
  // stream is encoded at, DTX, and each AIC subscriber's current layer.
  function renderStreams(rows) {
    const body = document.querySelector("#stream-layers tbody");
    body.textContent = "";
    if (!rows.length) {
      const tr = body.insertRow();
      const td = tr.insertCell();
      td.colSpan = 4;
      td.className = "muted";
      td.textContent = "no adaptive streams";
      return;
    }
    for (const r of rows) {
      const tr = body.insertRow();
      tr.insertCell().textContent = r.stream;
      tr.insertCell().textContent = (r.requested_kbps == null ? "-" : fmt(r.requested_kbps, 1) + " kbps") +
        (r.cap_kbps == null ? "" : " (cap " + fmt(r.cap_kbps, 1) + ")");
      tr.insertCell().textContent = (r.depth_n_q == null ? "-" : r.depth_n_q + " books") +
        (r.dtx ? ", " + r.dtx : "");
      tr.insertCell().textContent = r.subscribers.length
        ? r.subscribers.map(x => fmt(x.kbps, 1) + " kbps / " + x.packet_ms + " ms (" +
            fmt(x.wire_kbps, 1) + " on the wire" + (x.adaptive ? "" : ", fixed") + ")").join("; ")
        : "no AIC subscriber";
    }
  }

  function renderLimiter(lim) {
    const el = document.getElementById("limiter");
    if (!lim || (!lim.bridges_without_redis && !lim.unavailable_s)) { el.hidden = true; el.textContent = ""; return; }
    const open = (lim.policies || []).includes("fail-open");
    const cost = open ? fmt(lim.hints_fail_open) + " hints let through with no rate limit"
                      : fmt(lim.hints_fail_closed) + " hints dropped";
    el.textContent = "Hint limiter: " + (lim.bridges_without_redis
      ? "Redis unavailable on " + lim.bridges_without_redis + " of " + lim.bridges + " bridge(s), "
      : "Redis was unavailable, ") + fmt(lim.unavailable_s, 1) + " s without it (" +
      (lim.policies || []).join(", ") + "): " + cost + ", " + fmt(lim.errors) + " Redis errors.";
    el.hidden = false;
  }

  async function toggle(user, enabled, box) {
    desired.set(user, enabled);
    box.disabled = true;
    try {
      await api("users/" + encodeURIComponent(user) + "/ai", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ enabled: enabled }),
      });
      setStatus("AI compression " + (enabled ? "on" : "off") + " for " + user, true);
    } catch (e) {
      desired.delete(user);
      box.checked = !enabled;
      setStatus("toggle failed: " + e.message, false);
    } finally {
      box.disabled = false;
    }
  }

  async function poll() {
    try {
      const s = await api("stats");
      document.getElementById("streams").textContent = fmt(s.streams_live) +
        (s.streams_relayed ? " (+" + fmt(s.streams_relayed) + " relayed)" : "");
      document.getElementById("replicas").textContent = fmt(s.replicas);
      document.getElementById("fallback").textContent = (100 * (s.fallback_rate || 0)).toFixed(2) + " %";
      const sent = (s.kbps_ai || 0) + (s.kbps_native || 0);
      document.getElementById("bitrate").textContent = fmt(s.kbps_ai) + " / " + fmt(s.kbps_native);
      document.getElementById("meta").textContent = "bridges: " + (s.bridges || []).length +
        (s.compute ? " | compute: " + s.compute : "") +
        (s.time_dilation && s.time_dilation !== 1 ? " | time dilation x" + s.time_dilation : "");
      points.push({ t: s.at, sent: sent, native: s.kbps_all_native || 0 });
      while (points.length > HISTORY) points.shift();
      draw();
      renderReasons(s.fallback_by_reason);
      renderLimiter(s.limiter);
      renderStreams(s.streams || []);
      renderUsers(s.users || []);
      setStatus("live: " + new Date().toLocaleTimeString(), true);
    } catch (e) {
      setStatus("stats unavailable: " + e.message, false);
    }
  }

  document.getElementById("lookup").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const u = document.getElementById("user-input").value.trim();
    if (u) { pinned.add(u); poll(); }
  });
  readToken();
  draw();
  poll();
  setInterval(poll, 1000);
})();
