// The metadata filters: their rows, and a search's parameters (k, labels, where) read from them.

import { state } from "./state.js";
import { $, el } from "./dom.js";
import { refreshView } from "./search.js";

let conditionCount = 0;

export function addCondition() {
  conditionCount += 1;
  const n = conditionCount;
  const value = el("input", { type: "text", class: "cond-value", autocomplete: "off" });
  const min = el("input", { type: "number", step: "any", class: "cond-min" });
  const max = el("input", { type: "number", step: "any", class: "cond-max" });
  const valueBox = el("label", { class: "field" }, el("span", { text: "Value" }), value);
  const minBox = el("label", { class: "field", hidden: true }, el("span", { text: "From" }), min);
  const maxBox = el("label", { class: "field", hidden: true }, el("span", { text: "To" }), max);
  const test = el(
    "select",
    { class: "cond-test" },
    el("option", { value: "is", text: "is" }),
    el("option", { value: "any", text: "is one of (a, b, …)" }),
    el("option", { value: "range", text: "is between" }),
  );
  test.addEventListener("change", () => {
    const range = test.value === "range";
    valueBox.hidden = range;
    minBox.hidden = !range;
    maxBox.hidden = !range;
  });
  const row = el(
    "div",
    { class: "condition", role: "group", "aria-label": `Metadata filter ${n}` },
    el("label", { class: "field" }, el("span", { text: "Field" }), el("input", { type: "text", class: "cond-field", list: "metadata-fields", autocomplete: "off" })),
    el("label", { class: "field" }, el("span", { text: "Test" }), test),
    valueBox,
    minBox,
    maxBox,
    el("button", {
      type: "button",
      class: "remove",
      "aria-label": `Remove metadata filter ${n}`,
      text: "Remove",
      onclick: () => {
        row.remove();
        refreshView();
      },
    }),
  );
  row.addEventListener("change", () => refreshView());
  $("conditions").append(row);
  row.querySelector(".cond-field").focus();
}

// A typed value: numbers and true/false as such, "quoted" text as text, anything else as text.
function parseValue(text) {
  const t = text.trim();
  if (/^-?\d+(\.\d+)?([eE][-+]?\d+)?$/.test(t)) return Number(t);
  if (t === "true") return true;
  if (t === "false") return false;
  if (t.length >= 2 && t.startsWith('"') && t.endsWith('"')) {
    try {
      return JSON.parse(t);
    } catch {
      return t;
    }
  }
  return t;
}

// What a typed value may match: digits as a number and as text too (metadata.csv gives text,
// metadata.jsonl numbers, and the service tells them apart).
function candidates(text) {
  const value = parseValue(text);
  return typeof value === "number" && !text.trim().startsWith('"') ? [value, text.trim()] : [value];
}

export function whereFilter() {
  const where = {};
  for (const row of $("conditions").querySelectorAll(".condition")) {
    const field = row.querySelector(".cond-field").value.trim();
    if (!field) continue;
    const test = row.querySelector(".cond-test").value;
    if (test === "is") {
      const values = candidates(row.querySelector(".cond-value").value);
      where[field] = values.length > 1 ? values : values[0];
    } else if (test === "any") {
      where[field] = row.querySelector(".cond-value").value.split(",").map((v) => v.trim()).filter(Boolean).flatMap(candidates);
    } else {
      const range = {};
      const min = row.querySelector(".cond-min").value;
      const max = row.querySelector(".cond-max").value;
      if (min !== "") range.min = Number(min);
      if (max !== "") range.max = Number(max);
      if (Object.keys(range).length) where[field] = range;
    }
  }
  return Object.keys(where).length ? where : null;
}

export function searchParams() {
  const params = new URLSearchParams();
  const k = $("k").value.trim();
  if (k) params.set("k", k);
  for (const label of state.labels) params.append("label", label);
  const where = whereFilter();
  if (where) params.set("where", JSON.stringify(where));
  return params;
}
