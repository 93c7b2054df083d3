// The search page: a text and/or a file, target modalities and k -> POST /search -> a grid of results.
"use strict";
const token = new URLSearchParams(location.search).get("token");
const auth = token ? { Authorization: "Bearer " + token } : {};
const $ = (id) => document.getElementById(id);
let file = null;

function show(id, text) { const el = $(id); el.textContent = text || ""; el.hidden = !text; }

function pick(f) {
  file = f;
  $("filename").textContent = f ? f.name : "";
  $("clear").hidden = !f;
}

async function media(url) {  // fetched with the token, shown through a blob URL
  const response = await fetch(url, { headers: auth });
  if (!response.ok) throw new Error("item " + url + ": HTTP " + response.status);
  return URL.createObjectURL(await response.blob());
}

async function card(hit) {
  const el = document.createElement("div");
  el.className = "card " + hit.modality;
  el.dataset.id = hit.id;
  if (hit.modality === "text") {
    const p = document.createElement("div"); p.className = "text"; p.textContent = hit.text; el.append(p);
  } else if (hit.modality === "audio") {
    const a = document.createElement("audio"); a.controls = true; a.src = await media(hit.url); el.append(a);
  } else {
    const img = document.createElement("img"); img.alt = hit.modality + " " + hit.id; img.src = await media(hit.url);
    el.append(img);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = hit.modality + " #" + hit.id + " · score " + hit.score.toFixed(3);
  el.append(meta);
  return el;
}

async function search(event) {
  event.preventDefault();
  show("message", ""); show("notice", "");
  const body = new FormData();
  const text = $("text").value.trim();
  if (text) body.append("text", text);
  if (file) body.append("file", file, file.name);
  for (const box of document.querySelectorAll("input[name=targets]:checked")) body.append("targets", box.value);
  body.append("k", $("k").value);
  if (!text && !file) { show("message", "Type a query or choose a file first."); return; }
  $("status").textContent = "searching…";
  try {
    const response = await fetch("search", { method: "POST", body, headers: auth });
    const reply = await response.json().catch(() => ({ error: "HTTP " + response.status }));
    if (!response.ok) throw new Error(reply.error || "HTTP " + response.status);
    const cards = await Promise.all(reply.results.map(card));
    $("results").replaceChildren(...cards);
    const shed = reply.dropped.map((d) => d.modality + " dropped to meet the deadline");
    const waited = reply.deferred.map((d) => d.modality + " deferred behind " + d.behind.join(", "));
    if (shed.length || waited.length) show("notice", shed.concat(waited).join("; "));
    $("status").textContent = reply.results.length + " results for " + reply.query + " in " + reply.latency_ms.toFixed(0) + " ms";
  } catch (error) {
    $("results").replaceChildren();
    $("status").textContent = "";
    show("message", String(error.message || error));
  }
}

$("query").addEventListener("submit", search);
$("file").addEventListener("change", (e) => pick(e.target.files[0] || null));
$("clear").addEventListener("click", () => { $("file").value = ""; pick(null); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); pick(e.dataTransfer.files[0] || null); });
fetch("health").then((r) => r.json()).then((h) => { $("status").textContent = h.items + " items indexed"; });
