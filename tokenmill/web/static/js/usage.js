// The usage dashboard: the key's limits and spend, its usage per UTC day and model over the period
// (from /v1/usage/summary, or /admin/usage/summary for every key when an admin key asks) and its
// newest requests. Every value is data, written as text.
import { ApiError, api, apiKey, authRequired, bindKeyField, el, integer, usd } from "./common.js";
import { barChart } from "./chart.js";

const $ = (id) => document.getElementById(id);
const period = $("period");
const scope = $("scope");
const scopeField = $("scope-field");
const status = $("usage-status");
const alertBox = $("usage-error");
const dashboard = $("usage");
const DAY = 86400;

let generation = 0; // the latest load: the answers to earlier ones are dropped
let tables = 0; // numbers the ids of the tables' captions

// The period's UTC days, oldest first, and its start in unix seconds.
function periodDays(days) {
  const today = Math.floor(Date.now() / 1000 / DAY) * DAY;
  const start = today - (days - 1) * DAY;
  const dates = Array.from({ length: days },
    (_, i) => new Date((start + i * DAY) * 1000).toISOString().slice(0, 10));
  return { start, dates };
}

const orNone = (value, format) => (value === null || value === undefined ? "none" : format(value));
const day = (unix) => new Date(unix * 1000).toISOString().slice(0, 10);

function localTime(unix) {
  const when = new Date(unix * 1000);
  return el("time", { datetime: when.toISOString() },
    when.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" }));
}

// A table in a scrolling region named by its caption. columns: [{label, key, numeric}]; each row
// is an array of cells (text or nodes), the first one the row's header.
function table(caption, columns, rows) {
  const id = `usage-table-${++tables}`;
  const cls = (column) => [`col-${column.key}`, column.numeric ? "num" : ""].join(" ").trim();
  return el("div", { class: "table-wrap", role: "region", tabindex: 0, "aria-labelledby": id },
    el("table", { class: "data" }, el("caption", { id }, caption),
      el("thead", {}, el("tr", {}, ...columns.map((c) => el("th", { scope: "col", class: cls(c) },
        c.label)))),
      el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((cell, i) => el(
        i === 0 ? "th" : "td", { scope: i === 0 ? "row" : null, class: cls(columns[i]) },
        cell)))))));
}

function facts(entries) {
  return el("dl", { class: "facts" }, ...entries.map(([field, label, value]) =>
    el("div", {}, el("dt", {}, label), el("dd", { "data-field": field }, value))));
}

function keyCard(key) {
  const models = key.models === null ? "any" : key.models.join(", ") || "none";
  const card = [
    el("p", { class: "key-name" }, el("strong", {}, key.name), " ", el("code", {}, key.display),
      " ", el("span", { class: `badge ${key.status}` }, key.status),
      key.admin ? " " : null, key.admin ? el("span", { class: "badge" }, "admin") : null),
    facts([
      ["rpm", "Requests per minute", orNone(key.rpm, integer)],
      ["tpm", "Tokens per minute", orNone(key.tpm, integer)],
      ["models", "Allowed models", models],
      ["expires", "Expires", key.expires_at === null ? "never" : day(key.expires_at)],
      ["budget", "Budget", orNone(key.budget, usd)],
      ["spend", "Spend", usd(key.spend)],
      ["remaining", "Remaining budget", orNone(key.remaining_budget, usd)],
    ]),
  ];
  if (key.budget !== null) {
    const share = key.budget > 0 ? (key.spend / key.budget) * 100 : 100;
    const shown = share > 0 && share < 1 ? "under 1%" : `${Math.round(share)}%`;
    card.push(el("p", { class: "budget" },
      el("label", { for: "budget-meter" }, "Budget spent"), " ",
      el("meter", { id: "budget-meter", min: 0, max: key.budget, value: Math.min(key.spend,
        key.budget), "aria-describedby": "budget-share" }),
      " ", el("span", { id: "budget-share" }, `${shown} (${usd(key.spend)} of ${usd(key.budget)})`)));
  }
  return card;
}

function keysTable(keys) {
  const columns = [["name", "Name"], ["display", "Key"], ["status", "Status"], ["rpm", "RPM", 1],
    ["tpm", "TPM", 1], ["budget", "Budget", 1], ["spend", "Spend", 1],
    ["remaining", "Remaining", 1]].map(([key, label, numeric]) => ({ key, label, numeric }));
  const rows = keys.map((k) => [k.admin ? `${k.name} (admin)` : k.name, el("code", {}, k.display),
    k.status, orNone(k.rpm, integer), orNone(k.tpm, integer), orNone(k.budget, usd),
    usd(k.spend), orNone(k.remaining_budget, usd)]);
  return table("Every key: limits and spend to date", columns, rows);
}

// Sums of the summary's days: [requests, prompt, completion, cost] by `by(day)`.
function sums(days, by) {
  const out = new Map();
  for (const d of days) {
    const s = out.get(by(d)) ?? { requests: 0, prompt: 0, completion: 0, cost: 0 };
    s.requests += d.requests;
    s.prompt += d.prompt_tokens;
    s.completion += d.completion_tokens;
    s.cost += d.cost;
    out.set(by(d), s);
  }
  return out;
}

function charts(days, dates) {
  const perDay = sums(days, (d) => d.date);
  const values = (field) => dates.map((date) => perDay.get(date)?.[field] ?? 0);
  $("spend-chart").replaceChildren(barChart({ title: "Spend per day", dates, format: usd,
    series: [{ label: "Cost", values: values("cost") }] }));
  $("tokens-chart").replaceChildren(barChart({ title: "Tokens per day", dates, format: integer,
    series: [{ label: "Prompt tokens", values: values("prompt") },
      { label: "Completion tokens", values: values("completion") }] }));
}

function modelsTable(days) {
  const columns = [["model", "Model"], ["requests", "Requests", 1], ["prompt", "Prompt tokens", 1],
    ["completion", "Completion tokens", 1], ["cost", "Cost", 1]]
    .map(([key, label, numeric]) => ({ key, label, numeric }));
  const rows = [...sums(days, (d) => d.model)].sort(([a], [b]) => a.localeCompare(b))
    .map(([model, s]) => [el("code", {}, model), integer(s.requests), integer(s.prompt),
      integer(s.completion), usd(s.cost)]);
  return table("Usage per model over the period", columns, rows);
}

function recentTable(recent, every) {
  if (recent.length === 0) return el("p", {}, "No requests yet.");
  const columns = [["time", "Time"], every ? ["key", "Key"] : null, ["id", "ID"],
    ["model", "Model"], ["status", "Status"], ["finish", "Finish reason"],
    ["in", "Tokens in", 1], ["out", "Tokens out", 1], ["cost", "Cost", 1]]
    .filter(Boolean).map(([key, label, numeric]) => ({ key, label, numeric }));
  const rows = recent.map((r) => [localTime(r.created), every ? r.key : null,
    el("code", {}, r.id), r.model, r.status, r.finish_reason ?? "none",
    integer(r.prompt_tokens), integer(r.completion_tokens), usd(r.cost)]
    .filter((cell) => cell !== null));
  return table(`The ${recent.length} newest requests`, columns, rows);
}

function render(summary, own, dates, every) {
  const days = summary.days;
  $("key-card").replaceChildren(...keyCard(summary.keys.find((k) => k.name === own.name) ?? own));
  $("keys-section").hidden = !every;
  $("keys-table").replaceChildren(every ? keysTable(summary.keys) : "");
  const total = sums(days, () => "all").get("all") ?? { requests: 0, prompt: 0, completion: 0 };
  $("totals").replaceChildren(facts([
    ["requests", "Requests", integer(total.requests)],
    ["prompt_tokens", "Prompt tokens", integer(total.prompt)],
    ["completion_tokens", "Completion tokens", integer(total.completion)],
    ["cost", "Cost", usd(summary.total_cost)],
  ]));
  const empty = days.length === 0;
  $("usage-empty").hidden = !empty;
  $("charts").hidden = empty;
  $("models-section").hidden = empty;
  if (!empty) {
    charts(days, dates);
    $("models-table").replaceChildren(modelsTable(days));
  }
  $("recent-table").replaceChildren(recentTable(summary.recent, every));
  dashboard.hidden = false;
}

async function load() {
  const current = ++generation;
  alertBox.textContent = "";
  if (authRequired() && !apiKey()) {
    dashboard.hidden = true;
    scopeField.hidden = true;
    status.textContent = "Enter an API key above to see its usage (an admin creates keys with "
      + "tokenmill keys create).";
    return;
  }
  status.textContent = "Loading usage…";
  const { start, dates } = periodDays(Number(period.value));
  const every = !scopeField.hidden && scope.value === "every";
  try {
    const [mine, all] = await Promise.all([api(`/v1/usage/summary?start=${start}`),
      every ? api(`/admin/usage/summary?start=${start}`) : null]);
    if (current !== generation) return;
    const own = mine.keys[0];
    if (!own) throw new ApiError(404, "The server no longer knows this key.", null);
    scopeField.hidden = !own.admin;
    render(all ?? mine, own, dates, every);
    status.textContent = `Usage of ${every ? "every key" : `the key ${own.name}`} from ${dates[0]} `
      + `to ${dates.at(-1)} (UTC days).`;
  } catch (error) {
    if (current !== generation) return;
    dashboard.hidden = true;
    status.textContent = "";
    alertBox.textContent = error instanceof ApiError ? error.message
      : `Could not reach the server: ${error.message}`;
  }
}

let typing; // a load waits for the key to stop changing
bindKeyField(() => {
  scope.value = "mine";
  scopeField.hidden = true;
  clearTimeout(typing);
  typing = setTimeout(load, 300);
});
period.addEventListener("change", load);
scope.addEventListener("change", load);
$("refresh").addEventListener("click", load);
$("usage-controls").addEventListener("submit", (e) => e.preventDefault());
load();
