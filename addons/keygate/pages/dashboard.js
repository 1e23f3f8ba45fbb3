// keygate's usage page (docs/endpoints.md#the-usage-page). Self-contained: no library, no
// request anywhere but this gateway. Every text a client chose (key and model names) is
// set with textContent, never parsed as HTML.
(function () {
  "use strict";
  var STORE = "keygate-key";
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#2e90fa", "#12b76a", "#f79009", "#7a5af8", "#ee46bc", "#06aed4", "#84adff",
                "#a6ef67", "#fdb022", "#98a2b3"];
  var MAX_SERIES = 9;  // the rest of the names stack as "other"
  var period = "24h";

  function $(id) { return document.getElementById(id); }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function svgEl(tag, attrs) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, attrs[k]);
    return e;
  }
  function fmt(n) {
    if (n === null || n === undefined) return "-";
    return Number(n).toLocaleString("en-US", {maximumFractionDigits: 6});
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function status(text) { $("status").textContent = text || ""; }

  // ---- log in and out: the key lives in this tab's sessionStorage only

  function showLogin(message) {
    $("main").hidden = true;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("key").focus();
  }
  function logout(message) {
    sessionStorage.removeItem(STORE);
    showLogin(message);
  }

  // ---- data

  function query() {
    var p = new URLSearchParams();
    if (period === "custom") {
      if ($("since").value) p.set("since", $("since").value + ":00Z");
      if ($("until").value) p.set("until", $("until").value + ":00Z");
    } else {
      p.set("since", period);
    }
    p.set("by", "key");
    return p.toString();
  }

  function load() {
    var key = sessionStorage.getItem(STORE);
    if (!key) { showLogin(); return; }
    status("Loading\u2026");
    fetch("usage?" + query(), {
      headers: {"Authorization": "Bearer " + key}, cache: "no-store", credentials: "omit",
      referrerPolicy: "no-referrer"
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (doc) {
        if (r.status === 401) { logout("That key is not valid."); return; }
        if (r.status === 403) { logout("That key does not have the admin scope."); return; }
        if (!r.ok) {
          var msg = doc && doc.error;
          status("Error " + r.status + ": " + (typeof msg === "string" ? msg : (msg && msg.message) || ""));
          return;
        }
        $("login").hidden = true;
        $("main").hidden = false;
        $("logout").hidden = false;
        render(doc);
        status("Updated " + doc.generated_at);
      });
    }).catch(function (e) { status("Cannot reach the gateway: " + e); });
  }

  // ---- charts

  function days(since, until) {
    var out = [];
    var d = new Date(since.slice(0, 10) + "T00:00:00Z");
    var end = new Date(until);
    while (d < end) {
      out.push(d.toISOString().slice(0, 10));
      d = new Date(d.getTime() + 86400000);
    }
    return out;
  }

  function legend(names, colors) {
    var box = el("div", null, "legend");
    names.forEach(function (n, i) {
      var item = el("span");
      var sw = el("span", null, "swatch");
      sw.style.background = colors[i % colors.length];
      item.appendChild(sw);
      item.appendChild(document.createTextNode(n));
      box.appendChild(item);
    });
    return box;
  }

  // perDay: {day: {name: value}}; stacked bars, one per day of the period.
  function stacked(target, perDay, dayList, what) {
    clear(target);
    var totals = {};
    dayList.forEach(function (d) {
      var row = perDay[d] || {};
      for (var n in row) totals[n] = (totals[n] || 0) + row[n];
    });
    var names = Object.keys(totals).filter(function (n) { return totals[n] > 0; })
      .sort(function (a, b) { return totals[b] - totals[a] || (a < b ? -1 : 1); });
    var shown = names.slice(0, MAX_SERIES);
    var rest = names.slice(MAX_SERIES);
    if (rest.length) shown.push("other");
    if (!names.length) { target.appendChild(el("p", "No " + what + " in this period.", "empty")); return; }
    var W = Math.max(600, dayList.length * 22), H = 220, pad = 40;
    var max = 1;
    dayList.forEach(function (d) {
      var s = 0, row = perDay[d] || {};
      for (var n in row) s += row[n];
      if (s > max) max = s;
    });
    var svg = svgEl("svg", {width: W, height: H + 30, viewBox: "0 0 " + W + " " + (H + 30), role: "img"});
    var bw = (W - pad) / dayList.length;
    svg.appendChild(svgEl("line", {x1: pad, y1: H, x2: W, y2: H, stroke: "#d0d5dd"}));
    var top = svgEl("text", {x: 0, y: 10});
    top.textContent = fmt(max);
    svg.appendChild(top);
    dayList.forEach(function (d, i) {
      var row = perDay[d] || {};
      var y = H;
      var g = svgEl("g", {"class": "day", "data-day": d});
      shown.forEach(function (n, j) {
        var v = 0;
        if (n === "other" && rest.length) rest.forEach(function (r) { v += row[r] || 0; });
        else v = row[n] || 0;
        if (!v) return;
        var h = v / max * (H - 15);
        var rect = svgEl("rect", {x: pad + i * bw + 1, y: y - h, width: Math.max(1, bw - 2), height: h,
          fill: COLORS[j % COLORS.length], "class": "seg", "data-name": n, "data-value": v});
        var t = svgEl("title", {});
        t.textContent = d + " " + n + ": " + fmt(v);
        rect.appendChild(t);
        g.appendChild(rect);
        y -= h;
      });
      svg.appendChild(g);
      if (dayList.length <= 31 || i % 7 === 0) {
        var label = svgEl("text", {x: pad + i * bw + 2, y: H + 14});
        label.textContent = d.slice(5);
        svg.appendChild(label);
      }
    });
    target.appendChild(svg);
    target.appendChild(legend(shown, COLORS));
  }

  function requestsChart(target, steps, codesTable) {
    clear(target);
    clear(codesTable);
    var W = Math.max(600, steps.length * 6), H = 180, pad = 40, max = 1;
    steps.forEach(function (s) { if (s.requests > max) max = s.requests; });
    var svg = svgEl("svg", {width: W, height: H + 30, viewBox: "0 0 " + W + " " + (H + 30), role: "img"});
    var bw = (W - pad) / Math.max(1, steps.length);
    svg.appendChild(svgEl("line", {x1: pad, y1: H, x2: W, y2: H, stroke: "#d0d5dd"}));
    var top = svgEl("text", {x: 0, y: 10});
    top.textContent = fmt(max);
    svg.appendChild(top);
    var codes = {};
    steps.forEach(function (s, i) {
      var errors = 0;
      for (var c in s.errors) { errors += s.errors[c]; codes[c] = (codes[c] || 0) + s.errors[c]; }
      var g = svgEl("g", {"class": "step", "data-t": s.t, "data-requests": s.requests, "data-errors": errors});
      var h = s.requests / max * (H - 15);
      var x = pad + i * bw;
      var bar = svgEl("rect", {x: x, y: H - h, width: Math.max(1, bw - 1), height: h, fill: "#2e90fa"});
      var t = svgEl("title", {});
      var parts = [];
      for (var c2 in s.errors) parts.push(c2 + " " + s.errors[c2]);
      t.textContent = s.t + ": " + fmt(s.requests) + " requests" + (errors ? ", errors: " + parts.join(", ") : "");
      bar.appendChild(t);
      g.appendChild(bar);
      if (errors) {
        var eh = errors / max * (H - 15);
        g.appendChild(svgEl("rect", {x: x, y: H - eh, width: Math.max(1, bw - 1), height: eh, fill: "#d92d20"}));
      }
      svg.appendChild(g);
    });
    target.appendChild(svg);
    target.appendChild(legend(["requests", "errors"], ["#2e90fa", "#d92d20"]));
    var names = Object.keys(codes).sort();
    if (!names.length) return;
    var head = el("tr");
    head.appendChild(el("th", "error code"));
    head.appendChild(el("th", "requests", "num"));
    codesTable.appendChild(head);
    names.forEach(function (c) {
      var tr = el("tr");
      tr.setAttribute("data-code", c);
      tr.appendChild(el("td", c));
      tr.appendChild(el("td", fmt(codes[c]), "num"));
      codesTable.appendChild(tr);
    });
  }

  function bar(used, limit) {
    var td = el("td");
    if (!limit && limit !== 0) { td.textContent = "-"; return td; }
    var frac = limit > 0 ? Math.min(1, used / limit) : 1;
    var svg = svgEl("svg", {width: 100, height: 10, "class": "bar"});
    svg.appendChild(svgEl("rect", {x: 0, y: 0, width: 100, height: 10, fill: "#eaecf0", rx: 2}));
    svg.appendChild(svgEl("rect", {x: 0, y: 0, width: Math.round(frac * 100), height: 10, rx: 2,
      fill: frac >= 1 ? "#d92d20" : frac >= 0.8 ? "#f79009" : "#12b76a"}));
    td.appendChild(svg);
    td.appendChild(document.createTextNode(" " + fmt(used) + " / " + fmt(limit)));
    td.setAttribute("data-used", used);
    td.setAttribute("data-limit", limit);
    return td;
  }

  function pick(quotas, names) {
    for (var i = 0; i < names.length; i++) if (quotas[names[i]]) return quotas[names[i]];
    return null;
  }

  function table(node, headers, rows) {
    clear(node);
    var tr = el("tr");
    headers.forEach(function (h) { tr.appendChild(el("th", h[0], h[1] ? "num" : "")); });
    node.appendChild(tr);
    rows.forEach(function (r) { node.appendChild(r); });
  }

  function render(doc) {
    $("range").textContent = "From " + doc.since + " to " + doc.until + " (UTC, whole hours)" +
      (doc.complete_since && doc.complete_since > doc.since ? "; totals before " + doc.complete_since + " are incomplete" : "") +
      (doc.partial ? "; shared totals unreachable: this instance's own only" : "");
    var summary = $("summary");
    clear(summary);
    [["requests", doc.total.requests], ["tokens", doc.total.total_tokens], ["errors", doc.total.errors]]
      .concat(doc.series.cost !== null ? [["cost " + (doc.currency || ""), doc.series.cost]] : [])
      .forEach(function (c) {
        var card = el("div", null, "card");
        var v = el("div", fmt(c[1]), "value");
        v.id = "total-" + c[0].split(" ")[0];
        v.setAttribute("data-value", c[1]);
        card.appendChild(v);
        card.appendChild(el("div", c[0], "label"));
        summary.appendChild(card);
      });
    var dayList = days(doc.since, doc.until);
    stacked($("chart-tokens-key"), doc.series.tokens_by_day.key, dayList, "tokens");
    stacked($("chart-tokens-model"), doc.series.tokens_by_day.model, dayList, "tokens");
    $("requests-title").textContent = "Requests and errors per " + doc.step;
    requestsChart($("chart-requests"), doc.series.requests, $("error-codes"));

    var lat = [], slowest = 1;
    Object.keys(doc.series.latency).forEach(function (ch) {
      slowest = Math.max(slowest, doc.series.latency[ch].p95 || 0);
    });
    Object.keys(doc.series.latency).forEach(function (ch) {
      var l = doc.series.latency[ch];
      var tr = el("tr");
      tr.setAttribute("data-channel", ch);
      tr.appendChild(el("td", ch));
      tr.appendChild(el("td", fmt(l.p50) + " ms", "num"));
      tr.appendChild(el("td", fmt(l.p95) + " ms", "num"));
      tr.appendChild(el("td", fmt(l.requests), "num"));
      // p95 (light) behind p50 (dark), on one scale for every channel.
      var cell = el("td");
      var svg = svgEl("svg", {width: 240, height: 12, "class": "latency"});
      svg.appendChild(svgEl("rect", {x: 0, y: 1, height: 10, rx: 2, fill: "#b2ddff",
        width: Math.max(1, Math.round((l.p95 || 0) / slowest * 240))}));
      svg.appendChild(svgEl("rect", {x: 0, y: 1, height: 10, rx: 2, fill: "#2e90fa",
        width: Math.max(1, Math.round((l.p50 || 0) / slowest * 240))}));
      cell.appendChild(svg);
      tr.appendChild(cell);
      lat.push(tr);
    });
    table($("latency"), [["channel"], ["p50", 1], ["p95", 1], ["requests", 1], ["p50 / p95"]], lat);

    var keys = doc.keys.map(function (k) {
      var tr = el("tr");
      tr.setAttribute("data-key", k.key);
      tr.appendChild(el("td", k.key + (k.enabled ? "" : " (revoked)")));
      tr.appendChild(el("td", fmt(k.requests), "num"));
      tr.appendChild(el("td", fmt(k.tokens), "num"));
      tr.appendChild(el("td", fmt(k.errors), "num"));
      var today = pick(k.quotas, ["tokens_per_day", "requests_per_day", "budget_per_day"]);
      var whole = pick(k.quotas, ["tokens_total", "budget_total", "tokens_per_month", "budget_per_month", "requests_per_month"]);
      var a = bar(today ? today.used : null, today ? today.limit : null);
      a.className = "today";
      var b = bar(whole ? whole.used : null, whole ? whole.limit : null);
      b.className = "whole";
      tr.appendChild(a);
      tr.appendChild(b);
      return tr;
    });
    table($("keys"), [["key"], ["requests", 1], ["tokens", 1], ["errors", 1], ["today's quota"], ["total quota"]], keys);

    var chans = doc.channels.map(function (c) {
      var tr = el("tr");
      tr.setAttribute("data-channel", c.name);
      tr.appendChild(el("td", c.name));
      tr.appendChild(el("td", c.kind));
      tr.appendChild(el("td", c.state === "cooling" ? "cooling down (" + c.cooling_for_s + " s)" : c.state,
        "state-" + c.state));
      return tr;
    });
    table($("channels"), [["channel"], ["kind"], ["state"]], chans);
    if (!chans.length) $("channels").appendChild(el("caption", "No channels: requests go to the gateway's reverse target.", "empty"));
  }

  // ---- wiring

  var embedded = $("keygate-data");
  if (embedded) {
    // The static file of `keygate usage --html`: its data is in the page.
    $("period").hidden = true;
    $("login").hidden = true;
    $("main").hidden = false;
    var doc = JSON.parse(embedded.textContent);
    render(doc);
    status("Written " + doc.generated_at);
    return;
  }
  $("login").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var key = $("key").value.trim();
    $("key").value = "";
    if (!key) return;
    sessionStorage.setItem(STORE, key);
    load();
  });
  $("logout").addEventListener("click", function () { logout(); });
  Array.prototype.forEach.call(document.querySelectorAll("#period button[data-period]"), function (b) {
    b.addEventListener("click", function () {
      period = b.getAttribute("data-period");
      Array.prototype.forEach.call(document.querySelectorAll("#period button"), function (o) {
        o.classList.toggle("active", o === b);
      });
      $("custom").hidden = period !== "custom";
      if (period !== "custom") load();
    });
  });
  $("apply").addEventListener("click", load);
  document.querySelector('#period button[data-period="24h"]').classList.add("active");
  if (sessionStorage.getItem(STORE)) load(); else showLogin();
})();
