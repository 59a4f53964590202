"use strict";
// Everything the model writes is put on the page as text (textContent), never as
// HTML: an answer with <script> or tags shows them as characters.
const $ = (id) => document.getElementById(id);
const STORE = "llama-rs-conversations";
const SETTINGS = ["system", "temperature", "top_p", "max_tokens", "seed", "api_key"];
let state = load();
let controller = null;

function load() {
  try {
    const s = JSON.parse(localStorage.getItem(STORE));
    if (s && Array.isArray(s.conversations) && s.conversations.length) return s;
  } catch (e) { /* a broken store starts over */ }
  return { current: 0, conversations: [{ title: "New conversation", messages: [] }] };
}
function save() { localStorage.setItem(STORE, JSON.stringify(state)); }
function conversation() { return state.conversations[state.current]; }

// Text with ``` fences: the fenced parts become <pre><code>, all of it as text.
function render(el, text) {
  el.replaceChildren();
  const parts = text.split("```");
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = part.replace(/^[\w+-]*\n/, "");
      pre.appendChild(code);
      el.appendChild(pre);
    } else if (part) {
      el.appendChild(document.createTextNode(part));
    }
  });
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.dataset.role = role;
  render(div, text);
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function show() {
  $("messages").replaceChildren();
  for (const m of conversation().messages) bubble(m.role, m.content);
  const list = $("conversations");
  list.replaceChildren();
  state.conversations.forEach((c, i) => {
    const li = document.createElement("li");
    li.textContent = c.title;
    if (i === state.current) li.className = "current";
    li.onclick = () => { if (!controller) { state.current = i; save(); show(); } };
    list.appendChild(li);
  });
}

function settings() {
  const s = {};
  for (const k of SETTINGS) s[k] = $(k).value;
  localStorage.setItem(STORE + "-settings", JSON.stringify(s));
  return s;
}

async function send(text) {
  const s = settings();
  const conv = conversation();
  conv.messages.push({ role: "user", content: text });
  if (conv.messages.length === 1) conv.title = text.slice(0, 40);
  save(); show();
  const messages = [];
  if (s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of conv.messages) messages.push({ role: m.role, content: m.content });
  const body = { messages, stream: true, stream_options: { include_usage: true },
                 temperature: Number(s.temperature), top_p: Number(s.top_p),
                 max_tokens: Number(s.max_tokens) };
  if (s.seed !== "") body.seed = Number(s.seed);
  if ($("model_pick").value) body.model = $("model_pick").value;
  const headers = { "Content-Type": "application/json" };
  if (s.api_key) headers["Authorization"] = "Bearer " + s.api_key;
  const div = bubble("assistant", "");
  div.dataset.state = "streaming";
  let answer = "", tokens = 0, pieces = 0, first = null, stopped = false;
  const start = performance.now();
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      let msg = r.status + "";
      try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      if (r.status === 401) msg += " (enter the server's API key in the panel)";
      throw new Error(msg);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const ev = JSON.parse(line.slice(6));
        if (ev.error) throw new Error(ev.error.message);
        if (ev.usage) tokens = ev.usage.completion_tokens;
        for (const c of ev.choices || []) {
          const piece = (c.delta && c.delta.content) || "";
          if (piece) { first = first || performance.now(); pieces += 1; answer += piece; render(div, answer); }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else { div.className = "msg error"; render(div, "Error: " + e.message); }
  } finally {
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
    div.dataset.state = "done";
  }
  if (div.className !== "msg error") {
    conv.messages.push({ role: "assistant", content: answer });
    save();
    const end = performance.now();
    // Without the usage event (a stopped answer), count the streamed pieces.
    tokens = tokens || pieces;
    const ttft = first ? first - start : 0;
    const rate = first && tokens > 1 ? (tokens - 1) / ((end - first) / 1000) : 0;
    $("stats").textContent = `${tokens} tokens, ${rate.toFixed(1)} tok/s, first token after ${ttft.toFixed(0)} ms` +
      (stopped ? " (stopped)" : "");
  }
  $("messages").scrollTop = $("messages").scrollHeight;
}

$("composer").onsubmit = (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
};
$("input").onkeydown = (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
};
$("stop").onclick = () => { if (controller) controller.abort(); };
$("new-chat").onclick = () => {
  if (controller) return;
  state.conversations.push({ title: "New conversation", messages: [] });
  state.current = state.conversations.length - 1;
  save(); show();
};
try {
  const s = JSON.parse(localStorage.getItem(STORE + "-settings")) || {};
  for (const k of SETTINGS) if (s[k] !== undefined) $(k).value = s[k];
} catch (e) { /* defaults */ }
// The model picker: every model of the server with its state; the choice is kept.
async function listModels() {
  const headers = {};
  const key = $("api_key").value;
  if (key) headers["Authorization"] = "Bearer " + key;
  const pick = $("model_pick");
  const want = pick.value || localStorage.getItem(STORE + "-model") || "";
  try {
    const r = await fetch("/v1/models", { headers });
    if (!r.ok) return;
    const list = (await r.json()).data || [];
    pick.replaceChildren();
    for (const m of list) {
      const o = document.createElement("option");
      o.value = m.id;
      const st = m.status && m.status.value;
      o.textContent = st && st !== "loaded" ? m.id + " (" + st + ")" : m.id;
      pick.appendChild(o);
    }
    if (list.some((m) => m.id === want)) pick.value = want;
  } catch (e) { /* the list stays as it was */ }
}
$("model_pick").onchange = () => localStorage.setItem(STORE + "-model", $("model_pick").value);
// States change as models load and unload: refreshed while the picker is closed.
setInterval(() => { if (document.activeElement !== $("model_pick")) listModels(); }, 10000);
$("api_key").onchange = listModels;
listModels();
fetch("/health").then((r) => r.json()).then((h) => { $("model").textContent = h.status === "ok" ? "" : "(" + h.status + ")"; }).catch(() => {});
show();
