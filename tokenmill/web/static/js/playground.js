// The playground: a chat with a served model through POST /v1/chat/completions, streamed (the
// server-sent events are read here from the response body), with the sampling controls, a
// response format, each reply's stats, Stop and Regenerate, and the next request shown as code.
import {
  ApiError, authHeaders, authRequired, baseUrl, bindKeyField, el, integer, raiseForStatus, usd,
} from "./common.js";
import { snippets } from "./snippets.js";

const $ = (id) => document.getElementById(id);
const modelChoice = $("model-choice");
const systemPrompt = $("system-prompt");
const conversation = $("conversation");
const emptyNote = $("conversation-empty");
const message = $("message");
const composerStatus = $("composer-status");
const sendButton = $("send");
const stopButton = $("stop");
const regenerateButton = $("regenerate");
const clearButton = $("clear");
const controls = [...document.querySelectorAll("#config input")];
const format = $("response-format");
const schemaEditor = $("schema-editor");
const schemaName = $("schema-name");
const schemaText = $("json-schema");
const schemaStatus = $("schema-status");
const viewCode = $("view-code");
const codeNode = $("code-snippet");

// The conversation shown: {role, content, node, text, kept}; only `kept` turns are sent next
// (not a reply still streaming, one that failed, or one stopped before any text).
const turns = [];
let controller = null; // the AbortController of the reply streaming now, if one is

const labelOf = (input) => input.labels[0].textContent;

// ---- settings ----------------------------------------------------------------------------------

// The schema editor's text as {schema} when it is a JSON object, else {error}.
function parseSchema() {
  let value;
  try {
    value = JSON.parse(schemaText.value);
  } catch (err) {
    return { error: `Invalid JSON: ${err.message}` };
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    return { error: "The schema must be a JSON object." };
  }
  return { schema: value };
}

// The fields that must be valid to send: the sampling controls, and the schema editor's when
// the response format uses it.
const fieldsInUse = () => (format.value === "json_schema"
  ? [...controls, schemaName, schemaText] : controls);

// What is wrong with a field ("" when nothing): the input's own validity, or the schema's parse.
function problem(input) {
  if (input === schemaText) return parseSchema().error ?? "";
  return input.validity.valid ? "" : input.validationMessage;
}

// Reports a field's problem beside it (and marks it invalid); true when it has none.
function showProblem(input) {
  const text = problem(input);
  if (input === schemaText) {
    const shown = text || "Valid: a JSON object.";
    // Rewritten only on change, so the live region does not repeat itself at each keystroke.
    if (schemaStatus.textContent !== shown) schemaStatus.textContent = shown;
    schemaStatus.classList.toggle("error", Boolean(text));
  } else {
    $(`${input.id}-error`).textContent = text;
  }
  if (text) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
  return !text;
}

// The request body for `messages` with the current settings (which must be valid): sampling
// fields only where they differ from the API's default, but max_tokens always.
function requestBody(messages) {
  const body = { model: modelChoice.value, messages };
  for (const input of controls) {
    const value = input.valueAsNumber;
    if (input.name === "max_tokens" || value !== Number(input.dataset.default)) {
      body[input.name] = value;
    }
  }
  if (format.value === "json_object") {
    body.response_format = { type: "json_object" };
  } else if (format.value === "json_schema") {
    body.response_format = {
      type: "json_schema",
      json_schema: { name: schemaName.value, schema: parseSchema().schema },
    };
  }
  body.stream = true;
  body.stream_options = { include_usage: true };
  return body;
}

// The messages sent next: the system prompt, then the conversation's kept turns.
function history() {
  const messages = [];
  if (systemPrompt.value.trim()) messages.push({ role: "system", content: systemPrompt.value });
  for (const turn of turns) {
    if (turn.kept) messages.push({ role: turn.role, content: turn.content });
  }
  return messages;
}

function say(text) {
  composerStatus.textContent = text;
}

// True when every field in use is valid; otherwise reports each problem, says which fields to
// fix and moves the focus to the first.
function settingsValid() {
  const invalid = fieldsInUse().filter((input) => !showProblem(input));
  if (!invalid.length) return true;
  say(`Fix ${invalid.map(labelOf).join(", ")} first.`);
  invalid[0].focus();
  return false;
}

// "View code": the request Send would make now, the typed message included. Written only
// while the panel is open.
function updateCode() {
  if (!viewCode.open) return;
  const invalid = fieldsInUse().filter((input) => problem(input));
  if (invalid.length) {
    codeNode.textContent = `Fix ${invalid.map(labelOf).join(", ")} to see the code.`;
    return;
  }
  const messages = history();
  if (message.value.trim()) messages.push({ role: "user", content: message.value });
  const language = document.querySelector('input[name="code-language"]:checked').value;
  codeNode.textContent = snippets(baseUrl(), requestBody(messages), authRequired())[language];
}

// ---- the conversation --------------------------------------------------------------------------

// Runs `change` on the log, then keeps the log at its end if it was there (a reader who
// scrolled up to read is left where they are).
function follow(change) {
  const atEnd =
    conversation.scrollHeight - conversation.scrollTop - conversation.clientHeight < 32;
  change();
  if (atEnd) conversation.scrollTop = conversation.scrollHeight;
}

function addTurn(role, content) {
  const text = el("div", { class: "turn-text" }, content);
  const node = el("article", { class: role === "user" ? "turn user" : "turn assistant reply" },
    el("p", { class: "turn-role" }, role === "user" ? "You" : "Assistant"), text);
  const turn = { role, content, node, text, kept: role === "user" };
  turns.push(turn);
  follow(() => {
    emptyNote.hidden = true;
    conversation.append(node);
  });
  return turn;
}

function removeTurn() {
  turns.pop().node.remove();
  emptyNote.hidden = turns.length > 0;
}

// Buttons by state: Stop only while a reply streams; Send, Regenerate and Clear only when not.
// The focus moves off a button being disabled, so a keyboard user keeps their place.
function setStreaming(streaming) {
  const focused = document.activeElement;
  sendButton.disabled = streaming;
  stopButton.disabled = !streaming;
  regenerateButton.disabled = streaming || !turns.some((turn) => turn.role === "user");
  clearButton.disabled = streaming || !turns.length;
  conversation.setAttribute("aria-busy", String(streaming));
  if (focused?.disabled) (streaming ? stopButton : message).focus();
}

// The JSON payloads of a server-sent events body (events are `data:` lines ended by a blank
// line) until `data: [DONE]`; a body that ends before it is an error (the reply was cut off).
async function* events(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = done ? "" : lines.pop();
      if (done) lines.push(""); // an event the body ended without its blank line
      for (const raw of lines) {
        const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
        if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        } else if (line === "" && data.length) {
          const payload = data.join("\n");
          data = [];
          if (payload === "[DONE]") return;
          yield JSON.parse(payload);
        }
        // Other SSE fields (event:, id:, comments) are not used by this API.
      }
      if (done) throw new Error("The reply was cut off: the stream ended before it was complete.");
    }
  } finally {
    // Lets go of the connection however the reading ended; an aborted body rejects this too.
    reader.cancel().catch(() => {});
  }
}

function stat(name, text) {
  return el("span", { class: `stat-${name}` }, text);
}

// Writes the reply's stats under it: `sent`, `first` (the first content delta, or null) and
// `end` are performance.now() times; `usage` is the stream's usage chunk, if it came.
function showStats(turn, { sent, first, end, usage, stopped }) {
  const stats = [];
  if (stopped) {
    // The server sends no usage for a stopped reply, and deltas are not tokens: no count here.
    stats.push(stat("stopped", `stopped after ${integer(Math.round(end - sent))} ms`));
  } else if (usage) {
    const n = usage.completion_tokens;
    stats.push(stat("tokens", `${integer(n)} ${n === 1 ? "token" : "tokens"}`));
  }
  if (first !== null) {
    stats.push(stat("ttft", `${integer(Math.round(first - sent))} ms to first token`));
  }
  if (!stopped && usage && usage.completion_tokens > 1 && first !== null && end > first) {
    // the tokens after the first, over the time after the first (as TPOT counts them)
    const perSecond = (usage.completion_tokens - 1) / ((end - first) / 1000);
    stats.push(stat("tps", `${perSecond.toFixed(1)} tokens/s`));
  }
  if (!stopped && typeof usage?.estimated_cost === "number") {
    stats.push(stat("cost", usd(usage.estimated_cost)));
  }
  turn.node.append(el("p", { class: "reply-stats" }, ...stats));
}

// Streams the assistant's reply to the conversation as it stands into a new turn.
async function reply() {
  const body = requestBody(history());
  const turn = addTurn("assistant", "");
  turn.node.classList.add("streaming");
  controller = new AbortController();
  setStreaming(true);
  const sent = performance.now();
  let first = null;
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: authHeaders(), body: JSON.stringify(body),
      signal: controller.signal,
    });
    await raiseForStatus(response);
    for await (const chunk of events(response.body)) {
      if (chunk.error) {
        throw new ApiError(response.status, chunk.error.message || "The reply failed.",
          chunk.error.code ?? null);
      }
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        first ??= performance.now();
        turn.content += delta;
        follow(() => { turn.text.textContent = turn.content; });
      }
    }
    turn.kept = true;
    follow(() => showStats(turn, { sent, first, end: performance.now(), usage }));
  } catch (err) {
    if (err.name === "AbortError") {
      turn.node.classList.add("stopped");
      turn.kept = Boolean(turn.content); // the partial reply stays part of the conversation
      follow(() => showStats(turn, { sent, first, end: performance.now(), stopped: true }));
    } else {
      turn.node.classList.add("failed");
      follow(() => turn.node.append(el("p", { class: "reply-error", role: "alert" }, err.message)));
    }
  } finally {
    turn.node.classList.remove("streaming");
    controller = null;
    setStreaming(false);
    updateCode();
  }
}

function send() {
  if (controller) return;
  if (!message.value.trim()) {
    say("Type a message first.");
    message.focus();
    return;
  }
  if (!settingsValid()) return;
  say("");
  addTurn("user", message.value);
  message.value = "";
  reply();
  updateCode();
}

// Runs the last user turn again, in place of the reply (or error) that followed it.
function regenerate() {
  if (controller || !settingsValid()) return;
  say("");
  while (turns.length && turns.at(-1).role === "assistant") removeTurn();
  if (turns.length) reply();
}

function clear() {
  while (turns.length) removeTurn();
  say("");
  setStreaming(false);
  updateCode();
  message.focus();
}

// ---- wiring ------------------------------------------------------------------------------------

bindKeyField();

const wanted = new URLSearchParams(location.search).get("model");
if (wanted && [...modelChoice.options].some((option) => option.value === wanted)) {
  modelChoice.value = wanted;
}

$("playground").addEventListener("input", (event) => {
  const target = event.target;
  say(""); // a summary of problems is stale once something changes; fields keep their own
  if (target === format) schemaEditor.hidden = format.value !== "json_schema";
  if (controls.includes(target) || target === schemaName || target === schemaText) {
    showProblem(target);
  }
  updateCode();
});

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    send();
  }
});
stopButton.addEventListener("click", () => controller?.abort());
regenerateButton.addEventListener("click", regenerate);
clearButton.addEventListener("click", clear);
$("settings").addEventListener("submit", (event) => event.preventDefault());

$("reset").addEventListener("click", () => {
  for (const input of controls) {
    input.value = input.dataset.default;
    showProblem(input);
  }
  updateCode();
});

viewCode.addEventListener("toggle", updateCode);
$("copy-code").addEventListener("click", async (event) => {
  const button = event.currentTarget;
  try {
    await navigator.clipboard.writeText(codeNode.textContent);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed: select the text";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 2000);
});

showProblem(schemaText);
