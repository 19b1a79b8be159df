"""GET /: a small page to try the served model in a browser: drop an image (or type a text), see the calibrated top-k,
the unknown flag and the explanation (a map over the image, or highlighted tokens). No framework: one HTML page, one
script and one stylesheet, served from this process under a strict Content-Security-Policy (no inline script, no
other origin), calling the same /predict and /v2 routes as any client, with the service's API key when one is set.
"""

from __future__ import annotations

import html

# No inline script or style: the policy forbids both, so an injected string can never run.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-store"}

_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tlops: {name}</title>
<link rel="stylesheet" href="/page.css">
<script src="/page.js" defer></script>
</head>
<body data-model="{name}">
<header><h1>tlops</h1><span id="model">{name}</span></header>
<main>
<section id="auth">
  <label for="key">API key</label>
  <input id="key" type="password" autocomplete="off" placeholder="only if the service asks for one">
</section>
<section id="input">
  <div id="drop" hidden>
    <p>Drop an image here, or <label for="file" class="link">choose a file</label></p>
    <input id="file" type="file" accept="image/*,.dcm,application/dicom">
  </div>
  <div id="write" hidden>
    <textarea id="text" rows="4" placeholder="Type a text"></textarea>
    <button id="go" type="button">Classify</button>
  </div>
</section>
<p id="status" role="status">Loading the model's description...</p>
<section id="result" hidden>
  <h2><span id="label"></span> <span id="unknown" class="badge"></span></h2>
  <ol id="topk"></ol>
  <figure id="picture" hidden><canvas id="overlay" width="320" height="320"></canvas>
    <figcaption>Red: regions that raised <b id="maplabel"></b>'s score; blue: regions that lowered it.</figcaption>
  </figure>
  <figure id="sentence" hidden><p id="tokens"></p>
    <figcaption>Red tokens raised <b id="toklabel"></b>'s score; blue ones lowered it.</figcaption>
  </figure>
</section>
</main>
</body>
</html>
"""

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
header { display: flex; gap: 1em; align-items: baseline; padding: .6em 1.2em; background: #1d2330; color: #fff; }
header h1 { font-size: 1.2em; margin: 0; }
main { max-width: 44em; margin: 1.2em auto; padding: 0 1em; }
section { margin-bottom: 1em; }
#drop { border: 2px dashed #8b93a7; border-radius: 8px; padding: 2em; text-align: center; background: #fff; }
#drop.over { border-color: #2f6fde; background: #eef3fd; }
#file { display: none; }
.link { color: #2f6fde; text-decoration: underline; cursor: pointer; }
textarea { width: 100%; box-sizing: border-box; font: inherit; padding: .5em; }
button { margin-top: .4em; padding: .4em 1.2em; font: inherit; }
#key { width: 18em; margin-left: .5em; }
.badge { font-size: .6em; padding: .15em .6em; border-radius: 1em; vertical-align: middle; }
.badge.known { background: #d9f2df; color: #185c2b; }
.badge.unknown { background: #fde2c8; color: #8a4100; }
#topk { padding-left: 1.4em; }
#topk li { margin: .2em 0; }
.bar { display: inline-block; height: .7em; background: #2f6fde; margin-left: .6em; border-radius: 2px; }
canvas { max-width: 100%; border-radius: 6px; background: #fff; }
#tokens span { padding: 0 .05em; border-radius: 3px; }
#status.error { color: #a11; }
"""

JS = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const name = document.body.dataset.model;
let model = null, image = null;

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(message, error) {
  $("status").textContent = message;
  $("status").className = error ? "error" : "";
}

async function describe() {
  const r = await fetch("/v2/models/" + encodeURIComponent(name), {headers: headers()});
  if (r.status === 401) { status("This service needs its API key: enter it above.", true); return; }
  if (!r.ok) { status("The model is not available yet (" + r.status + "); reload the page shortly.", true); return; }
  model = await r.json();
  model.text = model.inputs.some((i) => i.name === "text");
  model.explains = model.outputs.some((o) => o.name === "explanation");
  $("drop").hidden = model.text;
  $("write").hidden = !model.text;
  status(model.text ? "Type a text and classify it." : "Drop an image to classify it.");
}

async function classify(body, contentType) {
  if (!model) await describe();
  if (!model) return;
  status("Classifying...");
  const query = "?top_k=5" + (model.explains ? "&explain=true" : "");
  const init = {method: "POST", body: body, headers: headers(contentType ? {"Content-Type": contentType} : {})};
  const r = await fetch("/predict" + query, init);
  const answer = await r.json().catch(() => ({error: "not JSON"}));
  if (!r.ok) {
    const why = r.status === 401 ? "This service needs its API key: enter it above." : answer.error;
    status(why || ("HTTP " + r.status), true);
    return;
  }
  status("");
  show(answer.predictions[0]);
}

function show(p) {
  $("result").hidden = false;
  $("label").textContent = p.top_k[0].label;
  const badge = $("unknown");
  if (p.unknown === undefined) { badge.textContent = ""; badge.className = "badge"; }
  else if (p.unknown) { badge.textContent = "unknown: unlike the training data"; badge.className = "badge unknown"; }
  else { badge.textContent = "known"; badge.className = "badge known"; }
  const list = $("topk");
  list.replaceChildren();
  for (const t of p.top_k) {
    const li = document.createElement("li");
    li.textContent = t.label + " " + (100 * t.probability).toFixed(1) + "%";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = (12 * t.probability).toFixed(2) + "em";
    li.appendChild(bar);
    list.appendChild(li);
  }
  $("picture").hidden = model.text;
  $("sentence").hidden = !model.text || !p.explanation;
  if (model.text && p.explanation) tokens(p.explanation);
  if (!model.text) picture(p.explanation);
}

function colour(v, max) {
  const a = Math.min(1, Math.abs(v) / (max || 1));
  return v >= 0 ? "rgba(220,40,30," + a.toFixed(3) + ")" : "rgba(40,90,220," + a.toFixed(3) + ")";
}

function tokens(e) {
  $("toklabel").textContent = e.label;
  const out = $("tokens");
  out.replaceChildren();
  const max = Math.max(...e.tokens.map((t) => Math.abs(t.share)));
  for (const t of e.tokens) {
    const span = document.createElement("span");
    span.textContent = t.token.startsWith("##") ? t.token.slice(2) : " " + t.token;
    span.style.background = colour(t.share, max);
    span.title = t.share.toFixed(4);
    out.appendChild(span);
  }
}

function picture(e) {
  const canvas = $("overlay"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!image) return;
  // the model sees the centred square of this share of the shorter side; so does the map
  const share = e ? e.covers.centre_square_of_shorter_side : 1;
  const side = Math.min(image.width, image.height) * share;
  const left = (image.width - side) / 2, top = (image.height - side) / 2;
  ctx.drawImage(image, left, top, side, side, 0, 0, canvas.width, canvas.height);
  if (!e) return;
  $("maplabel").textContent = e.label;
  const [h, w] = e.grid, small = document.createElement("canvas");
  small.width = w; small.height = h;
  const pixels = small.getContext("2d").createImageData(w, h);
  const max = Math.max(...e.map.flat().map(Math.abs));
  e.map.flat().forEach((v, i) => {
    const a = Math.min(1, Math.abs(v) / (max || 1));
    pixels.data.set(v >= 0 ? [220, 40, 30, 200 * a] : [40, 90, 220, 200 * a], 4 * i);
  });
  small.getContext("2d").putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
}

function take(file) {
  if (!file) return;
  image = null;
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => { image = img; classify(file); };
  img.onerror = () => classify(file);  // not a format the browser shows (DICOM, TIFF): classified all the same
  img.src = url;
}

window.addEventListener("DOMContentLoaded", () => {
  $("key").value = sessionStorage.getItem("tlops-key") || "";
  $("key").addEventListener("change", () => { sessionStorage.setItem("tlops-key", $("key").value); describe(); });
  $("file").addEventListener("change", (ev) => take(ev.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    take(ev.dataTransfer.files[0]);
  });
  $("go").addEventListener("click", () => classify(JSON.stringify({text: $("text").value}), "application/json"));
  describe();
});
"""


def page_html(model_name: str) -> str:
    """The page for the served model's name (escaped: a registered name is never markup)."""
    return _HTML.format(name=html.escape(model_name, quote=True))
