// The search: by the photo or by an item's similar items, and the grid of results.

import { state } from "./state.js";
import { api, endpointPath } from "./api.js";
import { $, announce, el, formatValue, hideError, showError, showImage } from "./dom.js";
import { searchParams, whereFilter } from "./filters.js";
import { openItem } from "./item.js";

let refreshTimer = null;

export function cancelRefresh() {
  clearTimeout(refreshTimer);
}

export function refreshView() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(runView, 150);
}

export async function runView() {
  if (!state.name || !state.view) return;
  const seq = ++state.searchSeq;
  const view = state.view;
  const params = searchParams();
  hideError();
  announce("Searching…");
  $("grid").setAttribute("aria-busy", "true");
  try {
    let answer;
    if (view.kind === "similar") {
      answer = await api(endpointPath(`/items/${view.item.id}/similar?${params}`));
    } else {
      const form = new FormData();
      form.append("image", state.photo, state.photo.name || "pasted-image");
      answer = await api(endpointPath(`/infer?${params}`), { method: "POST", body: form });
    }
    if (seq !== state.searchSeq) return; // a newer search was started meanwhile
    renderResults(view, answer);
  } catch (err) {
    if (seq !== state.searchSeq) return;
    showError(err);
    $("results-note").textContent = "No results: see the message above.";
    clearGrid();
  } finally {
    if (seq === state.searchSeq) $("grid").removeAttribute("aria-busy");
  }
}

export function setPhoto(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(`That is not an image (${file.type}).`);
    return;
  }
  state.photo = file;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  const preview = $("query-preview");
  preview.src = state.previewUrl;
  preview.hidden = false;
  state.view = { kind: "photo" };
  clearTimeout(refreshTimer);
  runView();
}

export function clearGrid() {
  for (const url of state.blobs) URL.revokeObjectURL(url);
  state.blobs = [];
  $("grid").replaceChildren();
}

function renderResults(view, answer) {
  clearGrid();
  const results = answer.results || [];
  const similar = view.kind === "similar";
  $("results-title").textContent = similar ? `Similar to ${view.item.name}` : "Matches for your photo";
  $("back-to-photo").hidden = !(similar && state.photo);
  const filtered = state.labels.size || whereFilter() ? " (filtered)" : "";
  const note = results.length
    ? `${results.length} ${results.length === 1 ? "item" : "items"}${filtered}, best first, from version ${answer.version}.`
    : `Nothing matches${filtered}.`;
  $("results-note").textContent = note;
  announce(note);
  for (const result of results) {
    for (const key of Object.keys(result.metadata || {})) state.fields.add(key);
  }
  $("metadata-fields").replaceChildren(...[...state.fields].sort().map((f) => el("option", { value: f })));
  $("grid").replaceChildren(...results.map((r) => resultCard(r)));
}

function resultCard(result) {
  const img = el("img", { alt: result.name, loading: "lazy", decoding: "async" });
  showImage(img, result.image_url);
  const metadata = Object.entries(result.metadata || {});
  return el(
    "li",
    { class: "result", "data-id": String(result.id), "data-name": result.name, "data-label": result.label },
    el(
      "button",
      {
        type: "button",
        class: "thumb",
        "aria-label": `More like ${result.name}`,
        title: "More like this",
        onclick: () => showSimilar(result),
      },
      img,
      el("span", { class: "thumb-hint", text: "More like this", "aria-hidden": "true" }),
    ),
    el(
      "div",
      { class: "result-body" },
      el("p", { class: "result-name", title: result.name, text: result.name }),
      el(
        "p",
        { class: "result-tags" },
        el("span", { class: "score", title: "cosine similarity", text: result.score.toFixed(3) }),
        result.label ? el("span", { class: "tag", text: result.label }) : null,
        result.photo ? el("span", { class: "tag photos-tag", text: "several photos" }) : null,
      ),
      metadata.length
        ? el(
            "dl",
            { class: "result-metadata" },
            metadata.slice(0, 4).map(([key, value]) => [el("dt", { text: key }), el("dd", { text: formatValue(value) })]),
          )
        : null,
      el("button", {
        type: "button",
        class: "details",
        text: "Details",
        "aria-label": `Details of ${result.name}`,
        onclick: () => openItem(result),
      }),
    ),
  );
}

export async function showSimilar(item) {
  state.view = { kind: "similar", item };
  clearTimeout(refreshTimer);
  await runView();
  $("results-title").scrollIntoView({ block: "nearest" });
  $("results-title").focus(); // the grid was redrawn: a keyboard user goes on from its title
}
