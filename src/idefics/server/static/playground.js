// The playground: one image (file, paste, drop or URL), a task, the answer as it streams, time to first token and
// tokens per second. It talks to the same API as any client: /v1/tasks, /v1/classify, /v1/chat/completions.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, history: [], modelId: null, controller: null };

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function showFields() {
  const m = mode();
  document.querySelectorAll("[data-modes]").forEach((el) => { el.hidden = !el.dataset.modes.split(" ").includes(m); });
}

function setImage(src) {
  state.image = src;
  const img = $("preview");
  img.src = src || "";
  img.classList.toggle("shown", Boolean(src));
  $("drop-hint").hidden = Boolean(src);
}

function readFile(file) {
  if (!file || !file.type.startsWith("image/")) return;
  const reader = new FileReader();
  reader.onload = () => { $("url").value = ""; setImage(reader.result); };
  reader.readAsDataURL(file);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function post(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body),
                                       signal: state.controller.signal });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// Server-sent events -> each parsed data object.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new Error(parsed.error.message);
        yield parsed;
      }
    }
  }
}

// Streams an answer into #answer -> its text.
async function stream(response, pieceOf) {
  const start = performance.now();
  let first = null, text = "", tokens = null;
  for await (const event of events(response)) {
    if (event.usage) tokens = event.usage.completion_tokens;
    for (const choice of event.choices || []) {
      const piece = pieceOf(choice);
      if (!piece) continue;
      if (first === null) first = performance.now();
      text += piece;
      $("answer").textContent = text;
    }
  }
  const end = performance.now();
  if (first !== null) {
    const rate = tokens && end > first ? ` · ${(tokens / ((end - first) / 1000)).toFixed(1)} tokens/s` : "";
    $("stats").textContent = `time to first token ${(first - start).toFixed(0)} ms${rate}` +
                             (tokens ? ` · ${tokens} tokens` : "");
  }
  return text;
}

function imageOrThrow() {
  const url = $("url").value.trim();
  if (url) return url;
  if (!state.image) throw new Error("choose an image first");
  return state.image;
}

async function runTask(task) {
  const body = { model: state.modelId, task, image: imageOrThrow(), stream: true,
                 stream_options: { include_usage: true } };
  if (task === "ask") body.question = $("question").value;
  if (task === "caption" && $("prompt").value.trim()) body.prompt = $("prompt").value;
  await stream(await post("/v1/tasks", body), (c) => c.text);
}

async function runClassify() {
  const labels = $("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
  const start = performance.now();
  const result = await (await post("/v1/classify", { model: state.modelId, image: imageOrThrow(), labels })).json();
  const bars = $("bars");
  bars.textContent = "";
  for (const { label, probability } of result.labels) {
    const row = document.createElement("div");
    row.className = "bar";
    const name = document.createElement("span");
    name.textContent = label;
    const track = document.createElement("div");
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = (100 * probability).toFixed(1) + "%";
    track.appendChild(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = (100 * probability).toFixed(1) + "%";
    row.append(name, track, value);
    bars.appendChild(row);
  }
  $("answer").textContent = result.labels[0].label;
  $("stats").textContent = `${(performance.now() - start).toFixed(0)} ms`;
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  div.textContent = (role === "user" ? "User: " : "Assistant: ") + text;
  $("history").appendChild(div);
}

async function runChat() {
  const text = $("question").value.trim();
  const content = [];
  const url = $("url").value.trim() || state.image;
  const attached = !state.history.some((m) => Array.isArray(m.content) && m.content.some((p) => p.type === "image_url"));
  if (url && attached) content.push({ type: "image_url", image_url: { url } });
  if (text) content.push({ type: "text", text });
  if (!content.length) throw new Error("type a message or choose an image");
  const messages = state.history.concat([{ role: "user", content }]);
  const body = { model: state.modelId, messages, stream: true, stream_options: { include_usage: true } };
  const reply = await stream(await post("/v1/chat/completions", body), (c) => c.delta && c.delta.content);
  state.history = messages.concat([{ role: "assistant", content: reply }]);
  addTurn("user", text || "[image]");
  addTurn("assistant", reply);
  $("question").value = "";
}

async function loadModel() {
  const r = await (await fetch("/v1/models", { headers: headers() })).json();
  if (!r.data) throw new Error(r.error ? r.error.message : "cannot list the models");
  state.modelId = r.data[0].id;
  $("model").textContent = state.modelId;
}

async function run() {
  $("error").textContent = $("stats").textContent = $("answer").textContent = "";
  $("bars").textContent = "";
  state.controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  try {
    if (!state.modelId) await loadModel();
    const m = mode();
    if (m === "classify") await runClassify();
    else if (m === "chat") await runChat();
    else await runTask(m);
  } catch (e) {
    if (e.name !== "AbortError") $("error").textContent = e.message;
  } finally {
    $("run").disabled = false;
    $("stop").disabled = true;
  }
}

function init() {
  document.querySelectorAll("input[name=mode]").forEach((el) => el.addEventListener("change", showFields));
  showFields();
  $("key").value = localStorage.getItem("idefics-key") || "";
  $("key").addEventListener("change", () => localStorage.setItem("idefics-key", $("key").value));
  $("file").addEventListener("change", (e) => readFile(e.target.files[0]));
  $("url").addEventListener("change", () => setImage($("url").value.trim() || null));
  $("clear-image").addEventListener("click", () => { $("url").value = ""; $("file").value = ""; setImage(null); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); readFile(e.dataTransfer.files[0]); });
  drop.addEventListener("click", () => $("file").click());
  document.addEventListener("paste", (e) => {
    for (const item of e.clipboardData.items) if (item.type.startsWith("image/")) readFile(item.getAsFile());
  });
  $("run").addEventListener("click", run);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("reset").addEventListener("click", () => { state.history = []; $("history").textContent = ""; });
  $("question").addEventListener("keydown", (e) => { if (e.key === "Enter") run(); });
  loadModel().catch(() => { $("model").textContent = "(enter the API key)"; });
}

init();
