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

  function draw() {
    const c = document.getElementById("graph");
    const ctx = c.getContext("2d");
    const w = c.width, h = c.height, pad = 40;
    ctx.clearRect(0, 0, w, h);
    ctx.strokeStyle = "#e3e7ec"; ctx.fillStyle = "#5b6675"; ctx.font = "11px sans-serif";
    let max = 1;
    for (const p of points) max = Math.max(max, p.sent, p.native);
    max *= 1.15;
    for (let i = 0; i <= 4; i++) {
      const y = h - pad / 2 - (h - pad) * i / 4;
      ctx.beginPath(); ctx.moveTo(pad, y); ctx.lineTo(w - 8, y); ctx.stroke();
      ctx.fillText(fmt(max * i / 4 / 1000, 1) + " Mb/s", 0, y - 2);
    }
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
      const state = !u.live ? "offline" : (u.bridge_opted_out ? "AI off (opted out)" : "AI on");
      tr.innerHTML = '<td class="user"></td><td class="stream"></td><td class="state"></td>' +
        '<td><label><input type="checkbox" class="ai-toggle"> AI compression</label></td>';
      tr.querySelector(".user").textContent = u.user;
      tr.querySelector(".stream").textContent = u.stream || "-";
      const st = tr.querySelector(".state");
      st.textContent = state;
      st.className = "state " + (u.live && !u.bridge_opted_out ? "state-on" : "state-off");
      const box = tr.querySelector(".ai-toggle");
      const known = u.ai_enabled !== false;
      if (desired.has(u.user) && desired.get(u.user) === known) desired.delete(u.user);
      box.checked = desired.has(u.user) ? desired.get(u.user) : known;
      box.setAttribute("aria-label", "AI compression for " + u.user);
      box.addEventListener("change", () => toggle(u.user, box.checked, box));
      body.appendChild(tr);
    }
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
      document.getElementById("streams").textContent = fmt(s.streams_live);
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
