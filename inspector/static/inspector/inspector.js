// Agent Runner inspector: live updates by short polls (no connection held open per watcher).
(function () {
  "use strict";
  var POLL_MS = 1500;

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // --- a run: follow its events and status while it is active --------------------------------
  function followRun(card) {
    var list = document.getElementById("events");
    var badge = document.getElementById("run-status");
    var live = document.getElementById("events-live");
    var after = parseInt(list.getAttribute("data-after") || "0", 10);
    var url = card.getAttribute("data-events-url");
    var startStatus = card.getAttribute("data-status");
    var stopped = false;

    function tick() {
      if (stopped) return;
      fetch(url + "?after=" + after, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
        .then(function (data) {
          data.events.forEach(function (e) {
            var li = el("li", "ev ev-" + e.type);
            li.setAttribute("data-seq", e.seq);
            li.appendChild(el("time", "", e.time));
            li.appendChild(document.createTextNode(" "));
            li.appendChild(el("b", "", e.type));
            li.appendChild(document.createTextNode(" " + e.message));
            li.classList.add("new");
            list.appendChild(li);
            after = Math.max(after, e.seq);
          });
          if (data.events.length && isNearBottom(list)) list.lastChild.scrollIntoView({ block: "nearest" });
          badge.textContent = data.status;
          badge.className = "badge status-" + data.status;
          card.setAttribute("data-status", data.status);
          if (!data.active) {
            stopped = true;
            live.textContent = "";
            // The run finished while watched: reload once to show its timeline, diff and report.
            if (data.status !== startStatus) window.setTimeout(function () { window.location.reload(); }, 400);
            return;
          }
          window.setTimeout(tick, POLL_MS);
        })
        .catch(function () { window.setTimeout(tick, POLL_MS * 3); });
    }
    window.setTimeout(tick, POLL_MS);
  }

  function isNearBottom(node) {
    var rect = node.getBoundingClientRect();
    return rect.bottom - window.innerHeight < 200;
  }

  // --- the list: refresh the rows while any run on the page is active --------------------------
  function followList(tbody) {
    var table = document.getElementById("runs");
    var base = table.getAttribute("data-live-url");
    var url = base + (base.indexOf("?") >= 0 ? "&" : "?") + "fragment=rows";
    function tick() {
      fetch(url, { credentials: "same-origin" })
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
        .then(function (html) {
          tbody.innerHTML = html;
          var active = tbody.querySelector('tr[data-status="running"], tr[data-status="queued"], tr[data-status="pending"]');
          if (active) window.setTimeout(tick, POLL_MS * 2);
        })
        .catch(function () { window.setTimeout(tick, POLL_MS * 4); });
    }
    window.setTimeout(tick, POLL_MS * 2);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var card = document.getElementById("run");
    if (card && card.getAttribute("data-active") === "1") followRun(card);
    var rows = document.getElementById("run-rows");
    if (rows && rows.getAttribute("data-live") === "1") followList(rows);
    var failure = document.getElementById("first-failure");
    var tail = document.getElementById("test-tail");
    if (failure && tail) tail.scrollTop = Math.max(0, failure.offsetTop - tail.offsetTop - 40);
    else if (tail) tail.scrollTop = tail.scrollHeight;
  });
})();
