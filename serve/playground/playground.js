// The LatentQA playground: plain JavaScript over the app's own API (serve/README.md), no framework.
// Every API call sends the token kept in this tab's sessionStorage; errors are shown next to the
// field the API blames (its `detail[].loc`) or in the banner, and never clear what was typed.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "latentqa-token";
// The side-by-side chat: each side's model, by the pane it streams into.
const CHAT_SIDES = { target: () => state.targetName, steered: () => state.steered };
const state = {
  dialog: [],
  roles: [], // the roles the target's chat template renders (GET /v1/target)
  systemPlacement: "own_turn",
  targetName: "target",
  steered: null,
  conversation: [], // the side-by-side chat: [{ user, replies: { target, steered } }]
};

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, body, retryAfter) {
    super(body.message || `HTTP ${status}`);
    Object.assign(this, { status, body, retryAfter });
  }
}

function headers() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) };
}

async function api(method, path, body) {
  const response = await fetch(path, { method, headers: headers(), body: body && JSON.stringify(body) });
  if (!response.ok) {
    const text = await response.text();
    let parsed;
    try { parsed = JSON.parse(text); } catch { parsed = { message: text || response.statusText }; }
    throw new ApiError(response.status, parsed, response.headers.get("Retry-After"));
  }
  return response;
}

const getJson = async (path) => (await api("GET", path)).json();
const postJson = async (path, body) => (await api("POST", path, body)).json();

// ---------------------------------------------------------------- errors

function clearErrors() {
  document.querySelectorAll(".field-error").forEach((el) => { el.textContent = ""; });
  document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  $("banner").hidden = true;
}

function banner(message) {
  $("banner").textContent = message;
  $("banner").hidden = false;
}

// The body path the API blames, as the page names its fields: a read's one dialog and question.
function fieldOf(loc) {
  const path = loc[0] === "body" ? loc.slice(1) : loc;
  const name = path.join(".").replace(/^dialogs\.0/, "dialog").replace(/^messages\.0/, "messages");
  return name.replace(/^questions\.\d+/, "questions");
}

// The most specific error slot for `field` ("dialog.1.content" -> "dialog.1" -> "dialog").
function errorSlot(field) {
  for (let parts = field.split("."); parts.length; parts.pop()) {
    const slot = document.querySelector(`.field-error[data-field="${parts.join(".")}"]`);
    if (slot) return slot;
  }
  return null;
}

function showError(err) {
  if (!(err instanceof ApiError)) return banner(String(err));
  const retry = err.retryAfter ? ` Retry in ${err.retryAfter} s.` : "";
  if (err.status === 401) {
    $("token-state").textContent = "refused";
    $("token-state").className = "";
    return banner(`401: ${err.message}. Enter the API token above.`);
  }
  if (err.status === 429 || err.status === 503) return banner(`${err.status}: ${err.message}.${retry}`);
  const details = Array.isArray(err.body.detail) ? err.body.detail : [];
  let placed = 0;
  for (const { loc, msg } of details) {
    const field = fieldOf(loc);
    const slot = errorSlot(field);
    if (!slot) continue;
    slot.textContent += `${field}: ${msg} `;
    placed += 1;
  }
  if (placed < details.length || !details.length) banner(`${err.status}: ${err.message}`);
}

// Runs `work` with its button disabled; any error is shown, and the editor is left as it was.
async function action(button, work) {
  clearErrors();
  button.disabled = true;
  button.classList.add("busy");
  try {
    await work();
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
    button.classList.remove("busy");
  }
}

// ---------------------------------------------------------------- the dialog editor

function renderDialog() {
  const turns = $("turns");
  turns.replaceChildren();
  state.dialog.forEach((message, index) => {
    const row = document.createElement("div");
    row.className = "turn";
    const role = document.createElement("select");
    role.setAttribute("aria-label", `turn ${index} role`);
    // A turn keeps its own role even if the template's roles lack it (a pasted dialog): nothing
    // changes behind the writer's back, and the API names what it refuses.
    for (const name of new Set([...state.roles, message.role])) {
      role.add(new Option(roleLabel(name), name, false, name === message.role));
    }
    role.onchange = () => { message.role = role.value; };
    const content = document.createElement("textarea");
    content.rows = 2;
    content.value = message.content;
    content.setAttribute("aria-label", `turn ${index} content`);
    content.oninput = () => { message.content = content.value; };
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.onclick = () => { state.dialog.splice(index, 1); renderDialog(); };
    const error = document.createElement("div");
    error.className = "field-error";
    error.dataset.field = `dialog.${index}`;
    error.style.gridColumn = "1 / -1";
    row.append(role, content, remove, error);
    turns.append(row);
  });
}

function roleLabel(role) {
  if (role !== "system" || state.systemPlacement === "own_turn") return role;
  return "system (inside the first user turn)"; // the template has no system turn of its own
}

function addTurn() {
  const last = state.dialog[state.dialog.length - 1];
  state.dialog.push({ role: last && last.role === "user" ? "assistant" : "user", content: "" });
  renderDialog();
}

// A dialog as JSON: a list of {role, content}, or an object holding one under "dialog" or "messages".
function parseDialog(text, where) {
  let value;
  try { value = JSON.parse(text); } catch (err) { throw new Error(`${where}: not JSON (${err.message})`); }
  const messages = Array.isArray(value) ? value : value && (value.dialog || value.messages);
  if (!Array.isArray(messages) || !messages.length) throw new Error(`${where}: expected a list of {role, content}`);
  messages.forEach((m, i) => {
    if (!m || typeof m.role !== "string" || typeof m.content !== "string") {
      throw new Error(`${where}: message ${i} needs a string role and a string content`);
    }
  });
  return messages.map(({ role, content }) => ({ role, content }));
}

function pasteDialog() {
  clearErrors();
  try {
    state.dialog = parseDialog($("dialog-json").value, "the pasted JSON");
    renderDialog();
  } catch (err) {
    errorSlot("dialog-json").textContent = err.message;
  }
}

async function copyDialog() {
  $("dialog-json").value = JSON.stringify(state.dialog, null, 2);
  $("dialog-json").select();
  try { await navigator.clipboard.writeText($("dialog-json").value); } catch { /* selected for Ctrl+C */ }
}

// ---------------------------------------------------------------- read, score, layer map

const lines = (id) => $(id).value.split("\n").map((s) => s.trim()).filter(Boolean);
const decoder = () => $("decoder").value || null;
const readLayer = () => ($("read-layer").value === "" ? null : Number($("read-layer").value));
const dialog = () => state.dialog.map((m) => ({ ...m }));

function cell(row, text, className) {
  const td = document.createElement(row.parentElement && row.parentElement.tagName === "THEAD" ? "th" : "td");
  td.textContent = text;
  if (className) td.className = className;
  row.append(td);
  return td;
}

function table(id, head, rows) {
  const t = $(id);
  t.replaceChildren();
  const tr = t.createTHead().insertRow();
  head.forEach((h) => cell(tr, h));
  const body = t.createTBody();
  return rows.map(() => body.insertRow());
}

async function read() {
  const questions = lines("questions");
  const body = await postJson("/v1/read", {
    dialogs: [dialog()], questions, decoder: decoder(), read_layer: readLayer(),
    max_new_tokens: Number($("max-new-tokens").value),
  });
  const rows = table("answers", ["question", `answer (layer ${body.read_layer})`], body.results[0]);
  body.results[0].forEach(({ question, answer }, i) => { cell(rows[i], question); cell(rows[i], answer || "(empty)"); });
}

function contrastDialog() {
  const text = $("contrast").value.trim();
  if (!text) return null;
  try { return parseDialog(text, "the shuffled baseline's dialog"); } catch (err) {
    errorSlot("contrast_dialog").textContent = err.message;
    throw new Error("the shuffled baseline's dialog is not valid JSON; see its field");
  }
}

const fmt = (loss) => (loss == null ? "" : loss.toFixed(3));

async function score() {
  const body = await postJson("/v1/score", {
    dialog: dialog(), question: $("score-question").value, candidates: lines("candidates"),
    decoder: decoder(), read_layer: readLayer(), baselines: true, contrast_dialog: contrastDialog(),
  });
  const columns = ["loss", "loss_shuffled", "loss_none"];
  const best = Object.fromEntries(columns.map((c) => [c, Math.min(...body.ranked.map((r) => r[c]))]));
  const rows = table("ranked", ["#", "candidate", "dialog's activations", "shuffled", "none", "gain over shuffled"],
    body.ranked);
  body.ranked.forEach((r, i) => {
    cell(rows[i], String(i + 1));
    cell(rows[i], r.answer);
    columns.forEach((c) => cell(rows[i], fmt(r[c]), r[c] === best[c] ? "num best" : "num"));
    cell(rows[i], fmt(r.loss_shuffled - r.loss), "num");
  });
}

// Lower loss, deeper colour: each cell against the whole map's range.
function heat(td, loss, low, high) {
  const strength = high > low ? (high - loss) / (high - low) : 1;
  td.style.background = `rgba(46, 125, 50, ${(0.1 + 0.7 * strength).toFixed(2)})`;
}

async function layerMap() {
  const scores = $("map-kind").value === "scores";
  const candidates = lines("candidates");
  const body = await postJson("/v1/layers", {
    dialog: dialog(), question: $("score-question").value, decoder: decoder(),
    candidates: scores ? candidates : null, max_new_tokens: Number($("max-new-tokens").value),
  });
  const rows = table("layers", ["layer", ...(scores ? candidates : ["answer"])], body.rows);
  const all = scores ? body.rows.flatMap((r) => r.losses) : [];
  const [low, high] = [Math.min(...all), Math.max(...all)];
  body.rows.forEach((r, i) => {
    const th = document.createElement("th");
    th.textContent = r.layer === body.read_layer ? `${r.layer} (trained)` : String(r.layer);
    rows[i].append(th);
    if (r.layer === body.read_layer) rows[i].className = "trained";
    if (!scores) return cell(rows[i], r.answer || "(empty)");
    r.losses.forEach((loss) => heat(cell(rows[i], fmt(loss), "num"), loss, low, high));
  });
}

// ---------------------------------------------------------------- steer

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

async function startControl() {
  const source = $("control-source").value;
  const text = $("control-text").value;
  let payload = text;
  if (source === "qa") {
    try { payload = JSON.parse(text); } catch (err) {
      errorSlot("qa").textContent = `qa: not JSON (${err.message})`;
      return;
    }
  }
  let job = await postJson("/v1/controls", {
    name: $("control-name").value, [source]: payload, decoder: decoder(), steps: Number($("control-steps").value),
  });
  while (job.status === "queued" || job.status === "running") {
    $("control-progress").value = job.progress;
    $("control-status").textContent = `${job.status}: step ${job.step}/${job.steps}`
      + (job.loss == null ? "" : `, loss ${job.loss.toFixed(3)}`);
    await sleep(1000);
    job = await getJson(`/v1/controls/${job.id}`);
  }
  $("control-progress").value = job.progress;
  $("control-status").textContent = job.status === "succeeded" ? `done: chat model ${job.adapter}` : `${job.status}: ${job.error}`;
  if (job.status === "succeeded") {
    state.steered = job.adapter;
    $("steered-title").textContent = `Steered (${job.adapter})`;
    newConversation(); // a new steered model starts the comparison afresh
  }
}

// One side's conversation as its model sees it: the shared user turns, the side's own replies.
function history(side) {
  return state.conversation.flatMap(({ user, replies }) => [
    { role: "user", content: user },
    { role: "assistant", content: replies[side] },
  ]);
}

// Draws a side's conversation so far and the user's new turn; returns where its reply goes.
function drawSide(side, user) {
  const pane = $(`chat-${side}`);
  pane.dataset.done = "";
  const say = (role, text) => {
    const p = document.createElement("p");
    p.className = role;
    p.textContent = text;
    pane.append(p);
    return p;
  };
  pane.replaceChildren();
  for (const turn of state.conversation) { say("user", turn.user); say("assistant", turn.replies[side]); }
  say("user", user);
  return say("assistant", "");
}

// One side's reply to `user`, streamed into its pane as the server-sent events arrive.
async function streamChat(side, user) {
  const out = drawSide(side, user);
  const response = await api("POST", "/v1/chat/completions", {
    model: CHAT_SIDES[side](), messages: [...history(side), { role: "user", content: user }], stream: true,
    max_tokens: 48,
  });
  const reader = response.body.getReader();
  const utf8 = new TextDecoder();
  let pending = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    pending += utf8.decode(value, { stream: true });
    const events = pending.split("\n\n");
    pending = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      out.textContent += chunk.choices[0].delta.content || "";
    }
  }
  $(`chat-${side}`).dataset.done = "true";
  return out.textContent;
}

// Both sides stream at once. The turn joins the conversation only when every side has answered,
// so the sides keep the same user turns; after a failure the message stays in the box to resend.
async function chat() {
  const user = $("chat-input").value;
  const sides = state.steered ? ["target", "steered"] : ["target"];
  const answers = await Promise.allSettled(sides.map((side) => streamChat(side, user)));
  const failed = answers.find((answer) => answer.status === "rejected");
  if (failed) throw failed.reason;
  state.conversation.push({ user, replies: Object.fromEntries(sides.map((side, i) => [side, answers[i].value])) });
  $("chat-input").value = "";
}

function newConversation() {
  state.conversation = [];
  for (const side of Object.keys(CHAT_SIDES)) $(`chat-${side}`).replaceChildren();
}

// ---------------------------------------------------------------- start

async function loadChoices() {
  const [decoders, target, models] = await Promise.all([getJson("/v1/decoders"), getJson("/v1/target"), getJson("/v1/models")]);
  $("decoder").replaceChildren(...decoders.decoders.map((d) => new Option(d.name, d.name, false, d.name === decoders.default)));
  const layers = $("read-layer");
  layers.replaceChildren(layers.options[0]);
  for (let layer = 0; layer < target.layers; layer++) layers.add(new Option(String(layer), String(layer)));
  state.targetName = target.name;
  state.roles = target.roles;
  state.systemPlacement = target.system_placement;
  renderDialog();
  $("target-title").textContent = `Target (${target.name})`;
  // A configured control (e.g. one shipped with the decoder) is the steered side until a new control is trained.
  const shipped = models.data.map((m) => m.id).find((id) => id !== target.name && !id.includes("/"));
  if (shipped && !state.steered) {
    state.steered = shipped;
    $("steered-title").textContent = `Steered (${shipped})`;
  }
  if (!$("questions").value) $("questions").value = target.questions.join("\n");
  if (!$("score-question").value) $("score-question").value = target.questions[0];
  if (!$("contrast").value) $("contrast").value = JSON.stringify(target.contrast_dialog, null, 2);
  $("token-state").textContent = "connected";
  $("token-state").className = "ok";
}

function start() {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token-form").onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    clearErrors();
    loadChoices().catch(showError);
  };
  state.dialog = [
    { role: "system", content: "You are a pirate who loves the sea." },
    { role: "user", content: "How was your day?" },
  ];
  renderDialog();
  $("candidates").value = "The assistant is a pirate.\nThe assistant is a baker.\nThe assistant is a doctor.";
  $("add-turn").onclick = addTurn;
  $("paste-json").onclick = pasteDialog;
  $("copy-json").onclick = copyDialog;
  $("chat-new").onclick = newConversation;
  for (const [id, work] of [["read", read], ["score", score], ["layer-map", layerMap],
    ["start-control", startControl], ["chat-send", chat]]) {
    $(id).onclick = () => action($(id), work);
  }
  loadChoices().catch(showError);
}

start();
