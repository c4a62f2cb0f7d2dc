// The admin page: reads the cluster's figures (the register's /metrics and /health, see the
// README's "Metrics") every second or two and draws them, without reloading.
//
// Why plain SVG and no chart library: the page server is a static server with no build step,
// and the pages load nothing from elsewhere (no CDN: the admin page must work on a cluster
// with no way out, and its Content-Security-Policy allows only its own scripts). A sparkline
// is one <polyline> whose points are the last minutes of one series: a few lines of code,
// drawn by the browser, readable at any width (the viewBox stretches with the tile).

import config from "./config.js";
import { parseExposition } from "./promtext.js";

const WINDOW_S = windowSeconds(); // what the charts show: the last 5 minutes (?window=S)
const GONE_KEPT_S = 60; // a member that left stays listed (greyed) this long
const HTTP_RE = /^https?:\/\/[^\s/]+/i;

/**
 * Where the figures are: `?metrics=URL` in the page URL wins, then the value the page server
 * injected in /config.js (`python -m web --metrics-url`), then http://<this page's host>:1237/metrics
 * (where `make run`'s register serves them).
 */
export function resolveMetricsUrl(loc = window.location, cfg = config) {
  const param = new URLSearchParams(loc.search).get("metrics");
  if (param && HTTP_RE.test(param)) return param;
  if (cfg && typeof cfg.metricsUrl === "string" && HTTP_RE.test(cfg.metricsUrl)) return cfg.metricsUrl;
  return `http://${loc.hostname || "127.0.0.1"}:1237/metrics`;
}

/** /health next to /metrics. */
export function healthUrl(metricsUrl) {
  const url = new URL(metricsUrl);
  url.pathname = url.pathname.replace(/\/metrics$/, "") + "/health";
  url.search = "";
  return url.toString();
}

/** The charts' span in seconds: `?window=S` (10 s to 1 h), else 300. */
function windowSeconds(loc = globalThis.location) {
  const span = Number(new URLSearchParams(loc ? loc.search : "").get("window"));
  return Number.isFinite(span) && span >= 10 && span <= 3600 ? span : 300;
}

/** Refresh period in ms: `?every=S` (0.5 to 10 s), else 1 s. */
function refreshMs(loc = window.location) {
  const every = Number(new URLSearchParams(loc.search).get("every"));
  return Number.isFinite(every) && every >= 0.5 && every <= 10 ? every * 1000 : 1000;
}

/**
 * The points of one series over the window: [[t (s, this page's clock), value, taken], ...].
 * ``taken`` is when the member took the figures (its process_up_seconds): a member's
 * snapshot reaches the register with its heartbeat, once a second, so the page may read the
 * same one twice; it is kept once, and rates are reckoned over the member's own clock.
 */
class Series {
  constructor() {
    this.points = [];
  }

  push(t, value, taken = t) {
    const last = this.points.at(-1);
    if (last && taken <= last[2]) return; // the same snapshot again
    this.points.push([t, value, taken]);
    while (this.points.length && this.points[0][0] < t - WINDOW_S - 5) this.points.shift();
  }

  get last() {
    return this.points.length ? this.points[this.points.length - 1][1] : 0;
  }

  /** Per-second rates between consecutive points (a counter; a reset counts from 0). */
  rates() {
    const out = [];
    for (let i = 1; i < this.points.length; i += 1) {
      const [, v0, t0] = this.points[i - 1];
      const [t, v1, t1] = this.points[i];
      if (t1 <= t0) continue;
      const delta = v1 >= v0 ? v1 - v0 : v1;
      out.push([t, delta / (t1 - t0)]);
    }
    return out;
  }

  /** What a tile shows: the value now (a gauge or a count) or the latest rate. */
  now(kind) {
    return kind === "rate" ? (this.rates().at(-1) || [0, 0])[1] : this.last;
  }
}

// What is shown: each tile is a label, how its number reads, and which figures make it.
// kind "gauge": the value now, charted as is; "rate": a counter, shown and charted per second;
// "count": a counter, its total shown, its increase per second charted.
const GATEWAY_TILES = [
  { key: "connections", label: "connections", kind: "gauge", names: ["gateway_connections"] },
  { key: "in", label: "msgs in/s", kind: "rate", names: ["gateway_client_messages_received_total"] },
  { key: "out", label: "msgs out/s", kind: "rate", names: ["gateway_client_frames_sent_total"] },
  { key: "waiting", label: "events waiting", kind: "gauge", names: ["gateway_events_waiting"] },
  { key: "slow", label: "slow cut off", kind: "count", names: ["gateway_slow_consumers_closed_total"] },
  {
    key: "refused",
    label: "refusals",
    kind: "count",
    names: ["gateway_handshake_refusals_total", "gateway_events_refused_total"],
  },
];
const WORKER_TILES = [
  { key: "events", label: "events/s", kind: "rate", names: ["worker_events_total"] },
  { key: "commands", label: "commands/s", kind: "rate", names: ["worker_commands_total"] },
  { key: "queries", label: "queries/s", kind: "rate", names: ["worker_queries_total"] },
  { key: "exceptions", label: "exceptions", kind: "count", names: ["worker_callback_exceptions_total"] },
];

const SVG = "http://www.w3.org/2000/svg";

/** A tile: its label, its number, its sparkline. */
function makeTile(tile) {
  const el = document.createElement("div");
  el.className = "tile";
  el.dataset.metric = tile.key;
  const label = document.createElement("span");
  label.className = "tile-label";
  label.textContent = tile.label;
  const value = document.createElement("span");
  value.className = "tile-value";
  value.textContent = "–";
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 100 30");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("aria-hidden", "true");
  const area = document.createElementNS(SVG, "polygon");
  area.setAttribute("class", "spark-area");
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("class", "spark-line");
  line.setAttribute("vector-effect", "non-scaling-stroke");
  svg.append(area, line);
  el.append(label, value, svg);
  return el;
}

function formatNumber(value, kind) {
  if (kind === "rate") return value >= 100 ? Math.round(value).toLocaleString("en") : value.toFixed(1);
  return Math.round(value).toLocaleString("en");
}

/** Draw [[t, v], ...] over the window ending at ``now``. */
function drawSpark(svg, points, now) {
  const start = now - WINDOW_S;
  const shown = points.filter(([t]) => t >= start);
  const top = Math.max(1, ...shown.map(([, v]) => v));
  const xy = shown.map(([t, v]) => {
    const x = ((t - start) / WINDOW_S) * 100;
    const y = 29 - (v / top) * 27;
    return `${x.toFixed(2)},${y.toFixed(2)}`;
  });
  const [area, line] = svg.children;
  line.setAttribute("points", xy.join(" "));
  svg.dataset.points = String(xy.length);
  if (xy.length) {
    const first = xy[0].split(",")[0];
    const last = xy[xy.length - 1].split(",")[0];
    area.setAttribute("points", `${first},30 ${xy.join(" ")} ${last},30`);
  } else {
    area.setAttribute("points", "");
  }
}

class Admin {
  constructor(metricsUrl, every) {
    this.metricsUrl = metricsUrl;
    this.healthUrl = healthUrl(metricsUrl);
    this.every = every;
    this.series = new Map(); // "id|tile" -> Series
    this.members = new Map(); // id -> {role, el, tiles, seen, stateEl}
    this.summary = new Map(); // tile key -> element
    this.busy = false;
  }

  start() {
    const source = document.getElementById("source");
    source.textContent = this.metricsUrl;
    source.href = this.metricsUrl;
    document.getElementById("every").textContent = String(this.every / 1000);
    document.getElementById("window").textContent =
      WINDOW_S >= 60 ? `${+(WINDOW_S / 60).toFixed(1)} min` : `${WINDOW_S} s`;
    const summary = document.getElementById("summary");
    for (const tile of GATEWAY_TILES) {
      const el = makeTile(tile);
      el.id = `total-${tile.key}`;
      summary.append(el);
      this.summary.set(tile.key, el);
    }
    this.tick();
    setInterval(() => this.tick(), this.every);
  }

  seriesOf(key) {
    let series = this.series.get(key);
    if (!series) {
      series = new Series();
      this.series.set(key, series);
    }
    return series;
  }

  async tick() {
    if (this.busy) return; // a slow answer: skip a turn rather than pile requests up
    this.busy = true;
    try {
      const [metrics, health] = await Promise.all([
        fetch(this.metricsUrl, { cache: "no-store" }),
        fetch(this.healthUrl, { cache: "no-store" }).catch(() => null),
      ]);
      if (!metrics.ok) throw new Error(`HTTP ${metrics.status}`);
      this.update(parseExposition(await metrics.text()), Date.now() / 1000);
      this.showHealth(health ? health.status : 0, health ? (await health.text()).trim() : "");
    } catch (err) {
      this.showHealth(-1, `cannot read ${this.metricsUrl}: ${err.message || err}`);
    } finally {
      this.busy = false;
    }
  }

  showHealth(status, text) {
    const el = document.getElementById("health");
    el.dataset.state = status === 200 ? "ok" : status === -1 ? "error" : "bad";
    document.getElementById("health-text").textContent = text || `health: HTTP ${status}`;
  }

  /** Sum each figure per member (over its other labels): id -> {role, values: {name: sum}}. */
  static byMember(samples) {
    const members = new Map();
    for (const { name, labels, value } of samples) {
      if (!labels.id || !labels.role || labels.role === "register") continue;
      let member = members.get(labels.id);
      if (!member) {
        member = { role: labels.role, values: {} };
        members.set(labels.id, member);
      }
      member.values[name] = (member.values[name] || 0) + value;
    }
    return members;
  }

  update(samples, now) {
    const members = Admin.byMember(samples);
    const totals = {};
    for (const [id, member] of members) {
      if (member.role !== "gateway" && member.role !== "worker") continue;
      const tiles = member.role === "gateway" ? GATEWAY_TILES : WORKER_TILES;
      const shown = this.memberView(id, member.role, tiles);
      shown.seen = now;
      const taken = member.values.process_up_seconds || now;
      for (const tile of tiles) {
        const value = tile.names.reduce((sum, name) => sum + (member.values[name] || 0), 0);
        const series = this.seriesOf(`${id}|${tile.key}`);
        series.push(now, value, taken);
        if (member.role === "gateway") totals[tile.key] = (totals[tile.key] || 0) + series.now(tile.kind);
      }
      const linked = member.values[member.role === "gateway" ? "gateway_workers_linked" : "worker_gateways_linked"] || 0;
      const state = linked > 0 ? "up" : member.role === "gateway" ? "no worker" : "no gateway";
      shown.el.dataset.state = linked > 0 ? "up" : "warn";
      shown.stateEl.textContent = `${state} · ${linked} ${member.role === "gateway" ? "worker" : "gateway"}${linked === 1 ? "" : "s"}`;
    }
    for (const tile of GATEWAY_TILES) this.seriesOf(`cluster|${tile.key}`).push(now, totals[tile.key] || 0);
    for (const [id, shown] of this.members) {
      if (shown.seen < now - 0.001) {
        shown.el.dataset.state = "gone";
        shown.stateEl.textContent = "gone";
        if (shown.seen < now - GONE_KEPT_S) {
          shown.el.remove();
          this.members.delete(id);
        }
      }
    }
    this.draw(now);
  }

  memberView(id, role, tiles) {
    let shown = this.members.get(id);
    if (shown) return shown;
    const el = document.createElement("article");
    el.className = "member";
    el.dataset.id = id;
    el.dataset.role = role;
    const head = document.createElement("header");
    const dot = document.createElement("span");
    dot.className = "dot";
    dot.setAttribute("aria-hidden", "true");
    const name = document.createElement("code");
    name.className = "member-id";
    name.textContent = id;
    const stateEl = document.createElement("span");
    stateEl.className = "member-state";
    head.append(dot, name, stateEl);
    const grid = document.createElement("div");
    grid.className = "tiles";
    const tileEls = new Map();
    for (const tile of tiles) {
      const tileEl = makeTile(tile);
      grid.append(tileEl);
      tileEls.set(tile.key, tileEl);
    }
    el.append(head, grid);
    document.getElementById(role === "gateway" ? "gateways" : "workers").append(el);
    shown = { role, el, tiles: tileEls, stateEl, seen: 0 };
    this.members.set(id, shown);
    return shown;
  }

  draw(now) {
    const paint = (el, tile, series, summed = false) => {
      // The cluster's series hold each tile's sum as shown (rates summed already).
      const value = summed ? series.last : series.now(tile.kind);
      el.querySelector(".tile-value").textContent = formatNumber(value, tile.kind);
      const points = summed || tile.kind === "gauge" ? series.points : series.rates();
      drawSpark(el.querySelector("svg"), points, now);
    };
    for (const tile of GATEWAY_TILES) {
      paint(this.summary.get(tile.key), tile, this.seriesOf(`cluster|${tile.key}`), true);
    }
    let gateways = 0;
    let workers = 0;
    for (const [id, shown] of this.members) {
      const live = shown.el.dataset.state !== "gone";
      if (shown.role === "gateway") gateways += live ? 1 : 0;
      else workers += live ? 1 : 0;
      const tiles = shown.role === "gateway" ? GATEWAY_TILES : WORKER_TILES;
      for (const tile of tiles) paint(shown.tiles.get(tile.key), tile, this.seriesOf(`${id}|${tile.key}`));
    }
    document.getElementById("gateway-count").textContent = String(gateways);
    document.getElementById("worker-count").textContent = String(workers);
  }
}

if (typeof document !== "undefined" && document.getElementById("summary")) {
  new Admin(resolveMetricsUrl(), refreshMs()).start();
}
