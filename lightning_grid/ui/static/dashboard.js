// lightning-grid dashboard: refresh the live part of a page in place, and the stop button.
// Plain JavaScript, no build. The server renders (and escapes) every fragment; this file only
// swaps them in, so user text never passes through innerHTML unescaped.
//
// Polling is cheap and only while something shown is live: each poll sends the last ETag back
// (If-None-Match), and the server answers 304 without any work while its registry has not changed.
// A live experiment's duration then grows here, from the server's clock at drawing time.
(function () {
  "use strict";

  const live = document.getElementById("live");
  if (!live) return;
  const token = (document.querySelector('meta[name="lightning-grid-token"]') || {}).content || "";
  const problem = document.getElementById("poll-error");
  const pollUrl = live.dataset.pollUrl;
  const pollMs = parseInt(live.dataset.pollMs || "1000", 10);
  let timer = null;
  let ticker = null;
  let busy = false;
  let etag = null;
  let offset = 0;  // server clock minus this browser's, when the shown fragment was drawn

  function fragment() {
    return live.querySelector(".fragment");
  }

  function isLive() {
    const f = fragment();
    return !f || f.dataset.live !== "false";
  }

  // As format_seconds in timeline.py: 0.4s, 12s, 3m05s, 1h02m.
  function formatSeconds(seconds) {
    seconds = Math.max(0, seconds);
    if (seconds < 60) return seconds < 10 ? seconds.toFixed(1) + "s" : seconds.toFixed(0) + "s";
    let minutes = Math.floor(Math.round(seconds) / 60);
    const secs = Math.round(seconds) % 60;
    if (minutes < 60) return minutes + "m" + String(secs).padStart(2, "0") + "s";
    const hours = Math.floor(minutes / 60);
    minutes = minutes % 60;
    return hours + "h" + String(minutes).padStart(2, "0") + "m";
  }

  function measureClock() {
    const f = fragment();
    const now = f ? parseFloat(f.dataset.now) : NaN;
    offset = isNaN(now) ? 0 : now - Date.now() / 1000;
  }

  function tick() {
    if (document.hidden) return;
    const now = Date.now() / 1000 + offset;
    live.querySelectorAll("[data-since]").forEach(function (cell) {
      cell.textContent = formatSeconds(now - parseFloat(cell.dataset.since));
    });
  }

  function swap(html) {
    // Keep what the reader opened (a log, the events) open across refreshes.
    const open = {};
    live.querySelectorAll("details[data-key]").forEach(function (d) { open[d.dataset.key] = d.open; });
    const scrolls = {};
    live.querySelectorAll("details[data-key] pre").forEach(function (p) {
      const key = p.parentElement.dataset.key;
      scrolls[key] = p.scrollHeight - p.scrollTop - p.clientHeight < 4 ? "bottom" : p.scrollTop;
    });
    live.innerHTML = html;
    live.querySelectorAll("details[data-key]").forEach(function (d) {
      if (d.dataset.key in open) d.open = open[d.dataset.key];
      const pre = d.querySelector("pre");
      if (pre && d.dataset.key in scrolls) {
        pre.scrollTop = scrolls[d.dataset.key] === "bottom" ? pre.scrollHeight : scrolls[d.dataset.key];
      }
    });
    measureClock();
    document.dispatchEvent(new CustomEvent("lightning-grid:refreshed"));
  }

  function showProblem(text) {
    if (!problem) return;
    problem.textContent = text || "";  // text, never markup
    problem.hidden = !text;
  }

  function stopPolling() {
    if (timer !== null) clearInterval(timer);
    if (ticker !== null) clearInterval(ticker);
    timer = ticker = null;
  }

  function startPolling() {
    if (!pollUrl) return;
    if (timer === null) timer = setInterval(refresh, pollMs);
    if (ticker === null && live.querySelector("[data-since]")) ticker = setInterval(tick, 1000);
  }

  async function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const headers = etag ? { "If-None-Match": etag } : {};
      const response = await fetch(pollUrl, { credentials: "same-origin", cache: "no-store", headers: headers });
      if (response.status === 304) {
        showProblem("");  // nothing changed on the server: nothing to redraw
      } else if (response.ok) {
        etag = response.headers.get("ETag");
        const html = await response.text();
        showProblem("");
        if (html !== live.dataset.last) {
          live.dataset.last = html;
          swap(html);
        }
      } else {
        showProblem((await response.text()).slice(0, 500) || "the dashboard answered " + response.status);
      }
    } catch (err) {
      // The server went away (Ctrl-C): keep the last view, try again later.
    } finally {
      busy = false;
    }
    if (!isLive()) {
      stopPolling();  // ended: nothing will change any more
    } else {
      startPolling();  // a live row may have appeared: its duration needs the ticker
    }
  }

  measureClock();
  if (isLive()) startPolling();
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && timer !== null) { tick(); refresh(); }
  });

  live.addEventListener("click", async function (event) {
    const button = event.target.closest("button[data-action='stop']");
    if (!button) return;
    const name = live.dataset.name;
    if (!window.confirm("Stop experiment " + name + "? Its script gets SIGTERM, then SIGKILL after the grace period.")) return;
    button.disabled = true;
    button.textContent = "stopping…";
    try {
      const response = await fetch(live.dataset.stopUrl, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Authorization": "Bearer " + token },
      });
      if (!response.ok) {
        const body = await response.json().catch(function () { return {}; });
        window.alert("Could not stop " + name + ": " + (body.error || response.status));
      }
    } finally {
      startPolling();
      refresh();
    }
  });
})();
