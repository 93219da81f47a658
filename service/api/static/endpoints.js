// The endpoints: the chooser, the chosen endpoint's summary, its label chips.

import { state } from "./state.js";
import { api } from "./api.js";
import { $, el, formatTime, showError } from "./dom.js";
import { refreshView } from "./search.js";
import { loadVersions } from "./versions.js";
import { resetDuplicates } from "./duplicates.js";

// Each loadEndpoints call's number: an older call's answer (say, the 401 of the load before a token
// was entered, arriving after the load with it) is dropped, or it would undo the newer one.
let loads = 0;

export async function loadEndpoints() {
  const mine = ++loads;
  let data;
  try {
    data = await api("/endpoints");
  } catch (err) {
    if (mine !== loads) return;
    const summary = $("endpoint-summary");
    summary.replaceChildren(
      el("p", {
        text:
          err.status === 401 || err.status === 403
            ? "This service needs an access token to be queried: enter it at the top."
            : "The endpoints could not be loaded.",
      }),
    );
    showError(err);
    return;
  }
  if (mine !== loads) return;
  state.endpoints = data.endpoints;
  const select = $("endpoint");
  const wanted = new URLSearchParams(location.search).get("endpoint");
  const names = state.endpoints.map((e) => e.name);
  let chosen = state.name && names.includes(state.name) ? state.name : null;
  if (!chosen && wanted && names.includes(wanted)) chosen = wanted;
  if (!chosen) chosen = (state.endpoints.find((e) => e.status === "ready") || state.endpoints[0] || {}).name;
  select.replaceChildren(...state.endpoints.map((e) => el("option", { value: e.name, text: e.name })));
  if (!chosen) {
    $("endpoint-summary").replaceChildren(el("p", { text: "This service has no endpoints." }));
    return;
  }
  select.value = chosen;
  await chooseEndpoint(chosen, false);
}

export async function refreshEndpoint() {
  try {
    const data = await api("/endpoints");
    state.endpoints = data.endpoints;
    const info = state.endpoints.find((e) => e.name === state.name);
    if (info) applyInfo(info);
  } catch (err) {
    showError(err);
  }
}

export async function chooseEndpoint(name, userChoice = true) {
  const changed = name !== state.name;
  state.name = name;
  if (userChoice) history.replaceState(null, "", `?endpoint=${encodeURIComponent(name)}`);
  if (changed) {
    state.labels.clear();
    state.fields.clear();
    state.view = state.photo ? { kind: "photo" } : null;
    resetDuplicates();
  }
  applyInfo(state.endpoints.find((e) => e.name === name));
  loadVersions();
  if (changed) refreshView();
}

function applyInfo(info) {
  if (!info) return;
  state.info = info;
  renderSummary(info);
  renderChips(info);
  const k = $("k");
  k.max = info.max_k || 100;
  if (!state.kTouched) k.value = info.default_k || 10;
}

function renderSummary(info) {
  const statusText = {
    ready: "ready",
    loading: "loading a version…",
    untrained: "not trained yet: train it below",
    failed: "failed to load its version",
  }[info.status] || info.status;
  const facts = [
    ["Status", el("span", { class: `badge status-${info.status}`, text: statusText })],
    ["Version", info.version ? el("code", { text: info.version }) : "none"],
    ["Items", String(info.count)],
    ["Labels", String(Object.keys(info.labels || {}).length)],
    ["Trained", formatTime(info.trained_at)],
  ];
  if (info.runtime && info.runtime.name) {
    // Which runtime runs the encoder: the converted model (LiteRT), or TensorFlow and why.
    const runtime = info.runtime.name === "litert" ? "LiteRT (converted)" : "TensorFlow";
    facts.push(["Encoder", el("span", { text: runtime, title: info.runtime.reason || "" })]);
  }
  if (info.degraded) {
    facts.push(["Store", el("span", { class: "badge status-failed", text: `unreachable since ${formatTime(info.degraded_since)}` })]);
  }
  if (info.error) facts.push(["Error", info.error]);
  $("endpoint-summary").replaceChildren(
    el("h2", { class: "summary-title" }, info.name, info.degraded ? el("span", { class: "badge status-failed", text: "degraded" }) : null),
    info.description ? el("p", { class: "muted", text: info.description }) : null,
    el("dl", { class: "summary-facts", id: "summary-facts" }, facts.map(([term, value]) => el("div", {}, el("dt", { text: term }), el("dd", {}, value)))),
  );
}

function renderChips(info) {
  const labels = Object.entries(info.labels || {}).sort(([a], [b]) => a.localeCompare(b));
  for (const label of [...state.labels]) if (!(info.labels || {})[label]) state.labels.delete(label);
  $("no-labels").hidden = labels.length > 0;
  $("label-chips").replaceChildren(
    ...labels.map(([label, count]) =>
      el(
        "button",
        {
          type: "button",
          class: "chip",
          "aria-pressed": state.labels.has(label) ? "true" : "false",
          "data-label": label,
          "aria-label": `Label ${label} (${count} items)`,
          onclick: (e) => toggleLabel(e.currentTarget, label),
        },
        label,
        el("span", { class: "count", text: String(count), "aria-hidden": "true" }),
      ),
    ),
  );
}

function toggleLabel(chip, label) {
  if (state.labels.has(label)) state.labels.delete(label);
  else state.labels.add(label);
  chip.setAttribute("aria-pressed", state.labels.has(label) ? "true" : "false");
  refreshView();
}
