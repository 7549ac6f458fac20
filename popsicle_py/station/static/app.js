// The station's page: the slots as a grid, live from /api/stream (Server-Sent Events).
// No library, no CDN: this file, the page and its stylesheet are all there is.
"use strict";

const WORDS = {
  empty: ["○", "empty"], probing: ["◔", "probing"], writing: ["▶", "writing"],
  verifying: ["↻", "verifying"], done: ["✔", "done: pull me"], failed: ["✖", "failed"],
  stopped: ["■", "stopped"], ignored: ["⊘", "not written"],
};
let first = null;   // the station and image seen first: a change is said in the banner
let source = null;

function size(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function duration(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s);
  return s >= 60 ? Math.floor(s / 60) + " min " + (s % 60) + " s" : s + " s";
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function tile(slot) {
  const t = el("div", "tile" + (slot.identify ? " identify" : ""));
  t.dataset.slot = slot.label;
  t.dataset.state = slot.state;
  const [symbol, word] = WORDS[slot.state] || ["?", slot.state];
  const top = el("div", "top");
  top.append(el("span", "label", slot.label), el("span", "state", symbol + " " + word));
  t.append(top);
  if (slot.drive) {
    const d = slot.drive;
    t.append(el("div", "drive", [d.vendor, d.model, size(d.size)].filter(Boolean).join(" ")
                + (d.serial ? " · " + d.serial : "")));
  }
  if (slot.progress !== null && slot.state !== "empty") {
    const bar = el("div", "bar");
    const fill = el("div");
    fill.style.width = (100 * slot.progress).toFixed(1) + "%";
    bar.append(fill);
    t.append(bar);
    const parts = [Math.floor(100 * slot.progress) + "%"];
    if (slot.speed) parts.push(size(slot.speed) + "/s");
    if (slot.eta) parts.push(duration(slot.eta) + " left");
    t.append(el("div", "numbers", parts.join(" · ")));
  }
  if (slot.why) t.append(el("div", "why", slot.why));
  return t;
}

function banner(text, kind) {
  const b = document.getElementById("banner");
  b.hidden = !text;
  b.textContent = text || "";
  b.dataset.kind = kind || "";
}

function render(state) {
  const id = state.station.id, sha = state.image.sha256;
  if (first === null) first = { id: id, sha: sha, name: state.image.name };
  if (sha !== first.sha) {
    banner("The image changed: now " + state.image.name + " (was " + first.name + ")", "change");
  } else if (id !== first.id) {
    banner("The station restarted at " + new Date(state.station.started * 1000)
           .toLocaleTimeString(), "change");
  } else if (state.ended) {
    banner("The station has stopped", "down");
  } else if (state.stopping) {
    banner("Stopping: the drives being written are finished, no new one is started", "change");
  } else {
    banner("");
  }
  document.getElementById("station").textContent = "Station " + state.station.name
    + (state.station.batch ? " · batch " + state.station.batch : "");
  document.getElementById("image").textContent = state.image.name + " (" + size(state.image.size) + ")";
  document.getElementById("sha").textContent = state.image.sha256 ? "SHA-256 " + state.image.sha256 : "";
  const c = state.counters;
  document.getElementById("n-ok").textContent = c.ok;
  document.getElementById("n-failed").textContent = c.failed;
  document.getElementById("n-total").textContent = c.total;
  document.getElementById("n-target").textContent = c.target ? " of " + c.target : "";
  document.getElementById("n-flight").textContent = c.in_flight;
  document.getElementById("slots").replaceChildren(...state.slots.map(tile));
  const others = document.getElementById("others");
  others.hidden = state.others.length === 0;
  document.getElementById("others-list").replaceChildren(...state.others.map(o =>
    el("li", "", o.device + (o.port ? " (port " + o.port + ")" : "") + ": " + (o.why || ""))));
  document.body.dataset.version = state.version;
}

function connection(word, up) {
  const c = document.getElementById("connection");
  c.textContent = word;
  c.dataset.state = up ? "up" : "down";
}

function connect() {
  source = new EventSource("/api/stream");
  source.addEventListener("state", e => { connection("live", true); render(JSON.parse(e.data)); });
  source.onopen = () => connection("live", true);
  source.onerror = () => {
    connection("station unreachable: reconnecting…", false);
    if (source.readyState === EventSource.CLOSED) {   // the browser gave up: try again
      source.close();
      setTimeout(connect, 1000);
    }
  };
}

connect();
