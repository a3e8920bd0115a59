// lightning-grid dashboard: refresh the live part of a page in place, and the stop button.
// Plain JavaScript, no build. The server renders (and escapes) every fragment; this file only
// swaps them in, so user text never passes through innerHTML unescaped.
(function () {
  "use strict";

  const live = document.getElementById("live");
  if (!live) return;
  const token = (document.querySelector('meta[name="lightning-grid-token"]') || {}).content || "";
  const pollUrl = live.dataset.pollUrl;
  const pollMs = parseInt(live.dataset.pollMs || "1000", 10);
  let timer = null;
  let busy = false;

  function isLive() {
    const fragment = live.querySelector(".fragment");
    return !fragment || fragment.dataset.live !== "false";
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
    document.dispatchEvent(new CustomEvent("lightning-grid:refreshed"));
  }

  async function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const response = await fetch(pollUrl, { credentials: "same-origin", cache: "no-store" });
      if (response.ok) {
        const html = await response.text();
        if (html !== live.dataset.last) {
          live.dataset.last = html;
          swap(html);
        }
      }
    } catch (err) {
      // The server went away (Ctrl-C): keep the last view, try again later.
    } finally {
      busy = false;
    }
    if (!isLive() && timer !== null) {
      clearInterval(timer);  // ended: nothing will change any more
      timer = null;
    }
  }

  if (pollUrl && isLive()) timer = setInterval(refresh, pollMs);
  document.addEventListener("visibilitychange", function () { if (!document.hidden && timer !== null) refresh(); });

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
      if (timer === null) timer = setInterval(refresh, pollMs);
      refresh();
    }
  });
})();
