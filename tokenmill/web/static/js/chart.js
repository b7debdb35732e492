// Bar charts per day in SVG, drawn from data (no library): one bar per day, stacked when there are
// several series. The SVG is an image with a summary for assistive technology; its numbers are in a
// table under "Show the data", and the axis labels are HTML text.
import { el } from "./common.js";

const SVG = "http://www.w3.org/2000/svg";
const SLOT = 10; // viewBox units per day; a bar takes BAR of them
const BAR = 7;
const HEIGHT = 100;

let charts = 0; // numbers the ids of the charts' tables

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children) node.append(child);
  return node;
}

// The smallest 1, 2 or 5 times a power of ten that is at least `value` (1 for nothing).
function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 5, 10].map((m) => m * power).find((m) => m >= value * (1 - 1e-12));
}

function describe(title, dates, series, totals, format) {
  const range = `${dates[0]} to ${dates.at(-1)} (UTC)`;
  const sums = series.map((s) => `${s.label} ${format(s.values.reduce((a, b) => a + b, 0))}`);
  const top = totals.indexOf(Math.max(...totals));
  const peak = totals[top] > 0 ? `highest on ${dates[top]} with ${format(totals[top])}`
    : "no usage";
  return `${title}, ${range}: ${sums.join(", ")} in total; ${peak}.`;
}

function dataTable(title, dates, series, totals, format) {
  const id = `chart-data-${++charts}`;
  const stacked = series.length > 1;
  const head = el("tr", {}, el("th", { scope: "col" }, "Date (UTC)"),
    ...series.map((s) => el("th", { scope: "col", class: "num" }, s.label)),
    stacked ? el("th", { scope: "col", class: "num" }, "Total") : null);
  const rows = dates.map((date, i) => el("tr", {}, el("th", { scope: "row" }, date),
    ...series.map((s) => el("td", { class: "num" }, format(s.values[i]))),
    stacked ? el("td", { class: "num" }, format(totals[i])) : null));
  return el("details", { class: "chart-data" }, el("summary", {}, "Show the data"),
    el("div", { class: "table-wrap", role: "region", tabindex: 0, "aria-labelledby": id },
      el("table", { class: "data" }, el("caption", { id }, `${title} (UTC days)`),
        el("thead", {}, head), el("tbody", {}, ...rows))));
}

// barChart({title, dates: ["YYYY-MM-DD", ...], series: [{label, values}], format}): a figure with
// the chart (one or two series, stacked bottom up, each with its class series-<i>), its legend
// when two, and its data table. `format` writes a value.
export function barChart({ title, dates, series, format }) {
  const totals = dates.map((_, i) => series.reduce((sum, s) => sum + s.values[i], 0));
  const max = niceMax(Math.max(0, ...totals));
  const width = dates.length * SLOT;
  const grid = [0, HEIGHT / 2, HEIGHT].map((y) => svg("line", {
    class: y === HEIGHT ? "axis" : "grid", x1: 0, x2: width, y1: y, y2: y,
    "vector-effect": "non-scaling-stroke" }));
  const days = dates.map((date, i) => {
    let base = HEIGHT;
    const bars = series.map((s, k) => {
      const height = (s.values[i] / max) * HEIGHT;
      base -= height;
      return svg("rect", { class: `bar series-${k}`, x: i * SLOT + (SLOT - BAR) / 2, y: base,
        width: BAR, height, "vector-effect": "non-scaling-stroke" },
      svg("title", {}, `${date}: ${format(s.values[i])} ${s.label.toLowerCase()}`));
    });
    return svg("g", { class: "day", "data-date": date }, ...bars);
  });
  const summary = describe(title, dates, series, totals, format);
  const image = svg("svg", { role: "img", "aria-label": summary, viewBox: `0 0 ${width} ${HEIGHT}`,
    preserveAspectRatio: "none" }, svg("title", {}, summary), ...grid, ...days);
  const legend = series.length > 1 ? el("ul", { class: "legend" }, ...series.map((s, k) =>
    el("li", {}, el("span", { class: `swatch series-${k}`, "aria-hidden": "true" }),
      `${s.label} (${k === 0 ? "lower" : "upper"} part of each bar)`))) : null;
  const yAxis = el("div", { class: "y-axis", "aria-hidden": "true" },
    ...[max, max / 2, 0].map((v) => el("span", {}, format(v))));
  const xAxis = el("div", { class: "x-axis", "aria-hidden": "true" },
    el("span", {}, dates[0]), el("span", {}, dates.at(-1)));
  return el("figure", { class: "chart" }, el("div", { class: "plot" }, yAxis, image, xAxis),
    legend, dataTable(title, dates, series, totals, format));
}
