// One item: its dialog with photos, similar items, edit, delete; and the refresh after any change.

import { state } from "./state.js";
import { api, endpointPath } from "./api.js";
import { $, announce, el, formatValue, hideError, sameOrigin, showError, showImage } from "./dom.js";
import { refreshEndpoint } from "./endpoints.js";
import { cancelRefresh, clearGrid, runView } from "./search.js";
import { loadVersions } from "./versions.js";

function photoUrl(item, index) {
  if (sameOrigin(item.image_url)) {
    const url = new URL(item.image_url, location.href);
    // /<name>/items/<id>/image or .../images/<n>: the signature (if any) holds for every photo.
    url.pathname = url.pathname.replace(/\/items\/(\d+)\/(image|images\/\d+)$/, `/items/$1/images/${index}`);
    return url.href;
  }
  const version = state.info && state.info.version ? `?version=${encodeURIComponent(state.info.version)}` : "";
  return endpointPath(`/items/${item.id}/images/${index}${version}`);
}

export async function openItem(item) {
  state.item = item;
  const dialog = $("item-dialog");
  $("item-title").textContent = item.name;
  $("item-delete").hidden = false;
  $("item-delete-confirm").hidden = true;
  $("edit-label").value = item.label || "";
  $("edit-metadata").value = JSON.stringify(item.metadata || {}, null, 2);
  renderItemFacts(item);
  const photos = $("item-photos");
  photos.replaceChildren();
  if (!dialog.open) dialog.showModal();
  if (!item.photo) {
    const img = el("img", { alt: item.name });
    photos.append(el("figure", {}, img));
    showImage(img, item.image_url);
    return;
  }
  // An item with several photos: the API does not say how many, so show them until one is missing.
  const matched = Number((item.image_url.match(/\/images\/(\d+)/) || [0, 0])[1]);
  for (let i = 0; i < 24 && state.item === item; i += 1) {
    const img = el("img", { alt: `${item.name}, photo ${i + 1}` });
    const figure = el("figure", {}, img, el("figcaption", { text: i === matched ? `photo ${i + 1} (matched)` : `photo ${i + 1}` }));
    photos.append(figure);
    if (!(await showImage(img, photoUrl(item, i)))) {
      figure.remove();
      break;
    }
  }
}

function renderItemFacts(item) {
  const facts = [
    ["Id", String(item.id)],
    ["Name", item.name],
    ["Label", item.label || "none"],
  ];
  if (typeof item.score === "number") facts.push(["Score", item.score.toFixed(4)]);
  if (item.photo) facts.push(["Matched photo", item.photo]);
  for (const [key, value] of Object.entries(item.metadata || {})) facts.push([key, formatValue(value)]);
  $("item-facts").replaceChildren(...facts.map(([t, d]) => [el("dt", { text: t }), el("dd", { text: d })]).flat());
}

// The edit route merges metadata one level deep: a changed field is sent whole (a nested object
// too, never a part of it, which would replace the rest), a removed one as null.
function mergePatch(before, after) {
  const patch = {};
  for (const key of Object.keys(before || {})) if (!(key in after)) patch[key] = null;
  for (const [key, value] of Object.entries(after)) {
    if (JSON.stringify((before || {})[key]) !== JSON.stringify(value)) patch[key] = value;
  }
  return Object.keys(patch).length ? patch : undefined;
}

export async function saveEdit(event) {
  event.preventDefault();
  const item = state.item;
  hideError();
  let metadata;
  try {
    metadata = JSON.parse($("edit-metadata").value || "{}");
  } catch (err) {
    showError(`The metadata is not valid JSON (${err.message}).`);
    return;
  }
  if (metadata === null || typeof metadata !== "object" || Array.isArray(metadata)) {
    showError("The metadata must be a JSON object.");
    return;
  }
  const body = {};
  const label = $("edit-label").value.trim();
  if (label !== (item.label || "")) body.label = label || null;
  const patch = mergePatch(item.metadata || {}, metadata);
  if (patch !== undefined) body.metadata = patch;
  if (!Object.keys(body).length) {
    announce("Nothing to change.");
    return;
  }
  try {
    const answer = await api(endpointPath(`/items/${item.id}`), { method: "PATCH", json: body });
    item.label = label || null;
    item.metadata = metadata;
    renderItemFacts(item);
    announce(`Saved item ${item.id}: version ${answer.version}.`);
    await afterChange();
  } catch (err) {
    showError(err);
  }
}

export function armDelete() {
  $("item-delete").hidden = true;
  $("item-delete-confirm").hidden = false;
  $("item-delete-confirm").focus();
}

export async function deleteItem() {
  const item = state.item;
  hideError();
  try {
    const answer = await api(endpointPath(`/items/${item.id}`), { method: "DELETE" });
    $("item-dialog").close();
    if (state.view && state.view.kind === "similar" && state.view.item.id === item.id) {
      state.view = state.photo ? { kind: "photo" } : null;
      if (!state.view) clearGrid();
    }
    announce(`Deleted item ${item.id} (${item.name}): version ${answer.version}.`);
    await afterChange();
    $("results-title").focus(); // the dialog and the item are gone: not back to the page's top
  } catch (err) {
    $("item-delete").hidden = false;
    $("item-delete-confirm").hidden = true;
    showError(err);
  }
}

// After anything that publishes a version: the endpoint's facts, its versions and the results.
export async function afterChange() {
  await Promise.all([refreshEndpoint(), loadVersions()]);
  if (state.view) {
    cancelRefresh();
    await runView();
  }
}
