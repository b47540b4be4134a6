// The enjambre web console: draws the node's live snapshot (GET /api/console/events),
// pulls models (POST /api/pull) and chats (POST /api/chat).
//
// Every text that comes from the API goes in with textContent, never as HTML: a peer can
// name itself anything. The stream is read with fetch() (EventSource cannot send the
// Authorization header); the token, when the node asks for one, is kept in localStorage.
"use strict";

const TOKEN_KEY = "enjambre.token";
const PALETTE = ["#f5b700", "#4cc9f0", "#f72585", "#80ed99", "#b388ff", "#ff8c42", "#43aa8b", "#e9c46a"];

const $ = (id) => document.getElementById(id);
const state = { nodes: new Map(), colors: new Map(), history: [], busy: false, modelsKey: "" };
let tokenWaiters = [];

class AuthError extends Error {}

// --- DOM helpers ---------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "data") Object.assign(node.dataset, value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function bar(fraction, color) {
  const fill = el("div", { class: "fill" });
  fill.style.width = `${Math.max(0, Math.min(1, fraction || 0)) * 100}%`;
  if (color) fill.style.background = color;
  return el("div", { class: "bar" }, fill);
}

function bytes(n) {
  const value = Number(n) || 0;
  const units = [["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];
  for (const [unit, size] of units) if (value >= size) return `${(value / size).toFixed(value >= 10 * size ? 1 : 2)} ${unit}`;
  return `${value} B`;
}

const short = (id) => String(id || "").slice(0, 12);
const nodeName = (id) => (state.nodes.get(id) || {}).name || short(id);
const colorOf = (id) => state.colors.get(id) || "#888";

// --- requests --------------------------------------------------------------------------------

function token() {
  try { return localStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }
}

async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  if (token()) headers.set("Authorization", `Bearer ${token()}`);
  const res = await fetch(path, { ...init, headers, cache: "no-store" });
  if (res.status === 401) {
    askToken();
    throw new AuthError("this node needs its API token");
  }
  return res;
}

async function errorOf(res) {
  try { return (await res.json()).error || `HTTP ${res.status}`; } catch { return `HTTP ${res.status}`; }
}

// Calls onPiece for each piece of the body between separators, as the body arrives.
async function readPieces(res, separator, onPiece) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let at;
      while ((at = buffer.indexOf(separator)) >= 0) {
        const piece = buffer.slice(0, at);
        buffer = buffer.slice(at + separator.length);
        if (piece.trim()) onPiece(piece);
      }
    }
    buffer += decoder.decode();
    if (buffer.trim()) onPiece(buffer);
  } finally {
    reader.cancel().catch(() => {});
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// --- token -----------------------------------------------------------------------------------

function askToken() {
  const form = $("token-form");
  if (form.hidden) {
    form.hidden = false;
    $("token-input").focus();
  }
}

function tokenSaved() {
  return new Promise((resolve) => tokenWaiters.push(resolve));
}

function saveToken(event) {
  event.preventDefault();
  try { localStorage.setItem(TOKEN_KEY, $("token-input").value.trim()); } catch { /* private mode: session only */ }
  $("token-input").value = "";
  $("token-form").hidden = true;
  const waiters = tokenWaiters;
  tokenWaiters = [];
  waiters.forEach((resolve) => resolve());
}

// --- the live snapshot -----------------------------------------------------------------------

function setConn(kind, text) {
  $("conn").dataset.state = kind;
  $("conn-text").textContent = text;
}

async function follow() {
  for (;;) {
    try {
      const res = await api("/api/console/events");
      if (!res.ok) throw new Error(await errorOf(res));
      setConn("live", "live");
      await readPieces(res, "\n\n", (event) => {
        for (const line of event.split("\n")) if (line.startsWith("data: ")) render(JSON.parse(line.slice(6)));
      });
      setConn("lost", "reconnecting…");
    } catch (err) {
      if (err instanceof AuthError) {
        setConn("auth", "token needed");
        await tokenSaved();
        continue;
      }
      setConn("lost", `reconnecting: ${err.message}`);
    }
    await sleep(2000);
  }
}

function render(snapshot) {
  const status = snapshot.status || {};
  const nodes = Array.isArray(status.nodes) ? status.nodes : [];
  state.nodes = new Map(nodes.map((n) => [n.id, n]));
  nodes.forEach((n) => { if (!state.colors.has(n.id)) state.colors.set(n.id, PALETTE[state.colors.size % PALETTE.length]); });
  const loaded = Array.isArray(snapshot.models) ? snapshot.models : [];
  const tags = Array.isArray(snapshot.tags) ? snapshot.tags : [];
  renderSummary(status, nodes);
  renderNodes(nodes, loaded);
  renderChains(loaded);
  renderModels(tags);
  renderModelChoice(loaded, tags);
}

function renderSummary(status, nodes) {
  const lent = nodes.reduce((sum, n) => sum + (Number(n.memory_allowed) || 0), 0);
  const tflops = nodes.reduce((sum, n) => sum + (Number(n.tflops) || 0), 0);
  $("summary").replaceChildren(
    el("span", { class: "pill", title: "cluster id" }, `cluster ${short(status.cluster)}`),
    el("span", {}, el("b", { text: String(nodes.length) }), nodes.length === 1 ? " node" : " nodes"),
    el("span", {}, el("b", { text: bytes(lent) }), " lent"),
    el("span", {}, el("b", { text: tflops.toFixed(2) }), " TFLOPS"),
  );
}

// The layers each node serves: the chains this node drives (with their memory), then
// what the node's own record says it serves for chains driven elsewhere.
function stagesOf(node, loaded) {
  const stages = loaded.flatMap((m) => (m.plan || []).filter((s) => s.node_id === node.id)
    .map((s) => ({ name: m.name, start: s.start, end: s.end, memory: Number(s.memory) || 0 })));
  const seen = new Set(stages.map((s) => `${s.start}:${s.end}:${String(s.name).replace(/:latest$/, "")}`));
  for (const s of Array.isArray(node.serving) ? node.serving : []) {
    if (!seen.has(`${s.start}:${s.end}:${String(s.name).replace(/:latest$/, "")}`)) stages.push({ ...s, memory: 0 });
  }
  return stages;
}

function renderNodes(nodes, loaded) {
  const cards = nodes.map((n) => {
    const stages = stagesOf(n, loaded);
    const used = stages.reduce((sum, s) => sum + s.memory, 0);
    const lent = Number(n.memory_allowed) || 0;
    const card = el("article", { class: "node", data: { nodeId: n.id, state: n.state || "" } },
      el("div", { class: "node-head" },
        el("span", { class: "swatch" }),
        el("span", { class: "node-name", text: n.name || short(n.id) }),
        el("span", { class: `badge state-${n.state}`, text: n.state || "?" })),
      el("div", { class: "node-id" }, el("code", { text: short(n.id) }), n.self ? el("span", { class: "self", text: "this node" }) : null),
      el("div", { class: "node-device", title: n.cpu_model || "", text: [n.device_kind, n.device].filter(Boolean).join(" · ") || "?" }),
      bar(lent ? used / lent : 0, colorOf(n.id)),
      el("div", { class: "node-mem" }, el("b", { text: bytes(used) }), " of ", el("b", { text: bytes(lent) }), " lent in use"),
      el("div", { class: "node-mem muted", text: [n.rss != null ? `process ${bytes(n.rss)}` : "", `${bytes(n.memory_total)} total`].filter(Boolean).join(" · ") }),
      el("div", { class: "node-stats" },
        el("span", { title: "measured matmul TFLOPS" }, el("b", { text: (Number(n.tflops) || 0).toFixed(2) }), " TFLOPS"),
        el("span", { class: "muted", text: `seen ${Number(n.last_seen_s || 0).toFixed(0)} s ago` })),
      stages.length ? el("ul", { class: "node-layers" }, ...stages.map((s) =>
        el("li", { text: `${s.name}: layers [${s.start}, ${s.end})` }))) : null,
    );
    card.querySelector(".swatch").style.background = colorOf(n.id);
    return card;
  });
  $("nodes").replaceChildren(...(cards.length ? cards : [el("p", { class: "empty", text: "No nodes yet." })]));
}

function renderChains(loaded) {
  const rows = loaded.map((m) => {
    const plan = Array.isArray(m.plan) ? m.plan : [];
    const layers = plan.reduce((most, s) => Math.max(most, s.end), 0);
    const segments = plan.map((s, i) => {
      const stage = el("div", { class: "stage", data: { nodeId: s.node_id, start: String(s.start), end: String(s.end) },
        title: `${nodeName(s.node_id)} (${short(s.node_id)}): layers [${s.start}, ${s.end}), ${bytes(s.memory)}` },
        el("span", { class: "stage-node", text: nodeName(s.node_id) }),
        el("span", { class: "stage-layers", text: `layers [${s.start}, ${s.end})` }));
      stage.style.flexGrow = String(Math.max(1, s.end - s.start));
      stage.style.borderColor = colorOf(s.node_id);
      return i ? [el("span", { class: "link-arrow", text: "→" }), stage] : [stage];
    }).flat();
    const details = m.details || {};
    return el("div", { class: "chain", data: { model: m.name } },
      el("div", { class: "chain-head" },
        el("span", { class: "chain-name", text: m.name }),
        el("span", { class: "muted", text: [`${layers} layers`, `${plan.length} nodes`, `context ${m.context_length}`,
          details.quantization_level, `${m.sessions} session${m.sessions === 1 ? "" : "s"}`].filter(Boolean).join(" · ") })),
      el("div", { class: "stages" }, ...segments));
  });
  $("chains").replaceChildren(...(rows.length ? rows : [el("p", { class: "empty", text: "No model is loaded." })]));
}

function renderModels(tags) {
  const rows = tags.map((t) => {
    const share = Number(t.local_share) || 0;
    return el("tr", { class: "model", data: { name: t.name } },
      el("td", { class: "model-name", text: t.name }),
      el("td", { text: bytes(t.size) }),
      el("td", { text: (t.details || {}).parameter_size || "—" }),
      el("td", { text: String(t.copies ?? 0) }),
      el("td", { text: String(t.holders ?? 0) }),
      el("td", { class: "share-col" }, bar(share), el("span", { class: "share", text: `${(share * 100).toFixed(0)}%` })));
  });
  $("models").replaceChildren(...rows);
  $("models-empty").hidden = rows.length > 0;
}

// Loaded models first, then the others in the cluster (a chat loads them on demand).
function renderModelChoice(loaded, tags) {
  const base = (name) => String(name).replace(/:latest$/, "");
  const ready = [...new Set(loaded.map((m) => m.name))];
  const others = [...new Set(tags.map((t) => t.name))].filter((n) => !ready.some((r) => base(r) === base(n)));
  const key = JSON.stringify([ready, others]);
  if (key === state.modelsKey) return;
  state.modelsKey = key;
  const select = $("chat-model");
  const chosen = select.value;
  const group = (label, names) => names.length
    ? el("optgroup", { label }, ...names.map((n) => el("option", { value: n, text: n }))) : null;
  select.replaceChildren(...[group("loaded", ready), group("in the cluster", others)].filter(Boolean));
  if ([...ready, ...others].includes(chosen)) select.value = chosen;
}

// --- pull ----------------------------------------------------------------------------------

async function pull(event) {
  event.preventDefault();
  const source = $("pull-input").value.trim();
  if (!source) return;
  const text = $("pull-text");
  const fill = $("pull-bar");
  $("pull-status").hidden = false;
  $("pull-send").disabled = true;
  text.textContent = `pulling ${source}…`;
  fill.style.width = "0%";
  try {
    const res = await api("/api/pull", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: source, stream: true }) });
    if (!res.ok) throw new Error(await errorOf(res));
    await readPieces(res, "\n", (line) => {
      const e = JSON.parse(line);
      if (e.error) throw new Error(e.error);
      if (e.total) fill.style.width = `${Math.min(100, (100 * (e.completed || 0)) / e.total)}%`;
      const amount = e.total ? ` ${bytes(e.completed || 0)} / ${bytes(e.total)}` : "";
      text.textContent = `${e.status || ""}${amount}`;
      if (e.status === "success") fill.style.width = "100%";
    });
  } catch (err) {
    text.textContent = `pull failed: ${err.message}`;
  } finally {
    $("pull-send").disabled = false;
  }
}

// --- chat ----------------------------------------------------------------------------------

function addMessage(role, content) {
  const log = $("chat-log");
  const msg = el("div", { class: `msg ${role}`, text: content });
  log.append(msg);
  log.scrollTop = log.scrollHeight;
  return msg;
}

function chatOptions() {
  const temperature = Number($("chat-temperature").value);
  const numPredict = parseInt($("chat-num-predict").value, 10);
  return {
    temperature: Number.isFinite(temperature) ? temperature : 0.8,
    num_predict: Number.isFinite(numPredict) && numPredict > 0 ? numPredict : 256,
  };
}

async function send(event) {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  const model = $("chat-model").value;
  if (!text || state.busy) return;
  if (!model) { addMessage("error", "No model to chat with yet: pull one first."); return; }
  state.busy = true;
  $("chat-send").disabled = true;
  input.value = "";
  addMessage("user", text);
  const turn = [...state.history, { role: "user", content: text }];
  const answer = addMessage("assistant", "");
  answer.classList.add("pending");
  let content = "";
  try {
    const res = await api("/api/chat", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages: turn, stream: true, options: chatOptions() }) });
    if (!res.ok) throw new Error(await errorOf(res));
    let final = null;
    await readPieces(res, "\n", (line) => {
      const piece = JSON.parse(line);
      if (piece.error) throw new Error(piece.error);
      if (piece.message) {
        content += piece.message.content || "";
        answer.textContent = content;
        $("chat-log").scrollTop = $("chat-log").scrollHeight;
      }
      if (piece.done) final = piece;
    });
    state.history = [...turn, { role: "assistant", content }];
    showSpeed(final);
  } catch (err) {
    addMessage("error", err.message);
  } finally {
    answer.classList.remove("pending");
    answer.dataset.done = "true";
    state.busy = false;
    $("chat-send").disabled = false;
    input.focus();
  }
}

function showSpeed(final) {
  if (!final || !(final.eval_duration > 0)) { $("tps").textContent = ""; return; }
  const rate = final.eval_count / (final.eval_duration / 1e9);
  const nodes = Array.isArray(final.nodes) ? ` · ${final.nodes.length} nodes` : "";
  $("tps").textContent = `${rate.toFixed(1)} tokens/s · ${final.eval_count} tokens${nodes}`;
}

function clearChat() {
  if (state.busy) return;
  state.history = [];
  $("chat-log").replaceChildren();
  $("tps").textContent = "";
}

// --- start ---------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", saveToken);
  $("pull-form").addEventListener("submit", pull);
  $("chat-form").addEventListener("submit", send);
  $("chat-clear").addEventListener("click", clearChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  follow();
});
