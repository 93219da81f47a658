// The page's script: everything it shows comes from the service's JSON routes (docs/API.md).
// No framework and no build step. The DOM is built from elements and text only, never from markup
// (item names and metadata come from uploaded zips); the page's CSP enforces it (Trusted Types).

const $ = (id) => document.getElementById(id);

const state = {
  token: "", // the access token: in this page's memory only, never stored
  endpoints: [],
  name: null, // the chosen endpoint
  info: null, // its status (GET /endpoints)
  photo: null, // the query photo (a File or Blob)
  view: null, // {kind: "photo"} or {kind: "similar", item}
  labels: new Set(), // chosen label chips
  fields: new Set(), // metadata fields seen in results (suggested in the filter's field box)
  item: null, // the item shown in the dialog
  kTouched: false,
  searchSeq: 0,
  jobSeq: 0,
  blobs: [], // blob: URLs of the grid's images (revoked when the grid is drawn again)
  previewUrl: null,
};

// --- talking to the service ----------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

function flattenErrors(errors, prefix = "") {
  if (errors === null || errors === undefined) return [];
  if (typeof errors !== "object") return [prefix ? `${prefix}: ${errors}` : String(errors)];
  if (Array.isArray(errors)) return errors.flatMap((e) => flattenErrors(e, prefix));
  return Object.entries(errors).flatMap(([key, value]) => {
    // flask-smorest nests a request's errors under where they came from ("query", "json", ...).
    const where = !prefix && ["json", "query", "form", "files", "headers"].includes(key);
    return flattenErrors(value, where ? "" : prefix ? `${prefix}.${key}` : key);
  });
}

// The service's answer as JSON, or an ApiError carrying the message the service gave.
function readAnswer(status, statusText, text, contentType) {
  let data = null;
  if (contentType && contentType.includes("json")) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (status >= 200 && status < 300) return data;
  if (data && typeof data.message === "string") {
    const details = flattenErrors(data.errors);
    const message = details.length ? `${data.message}: ${details.join("; ")}` : data.message;
    throw new ApiError(message, status);
  }
  throw new ApiError(`The service answered ${status} ${statusText || ""}`.trim(), status);
}

async function api(path, { method = "GET", json, body } = {}) {
  const headers = authHeaders();
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, cache: "no-store" });
  } catch (err) {
    throw new ApiError(`Could not reach the service (${err.message}).`, 0);
  }
  const text = await response.text();
  return readAnswer(response.status, response.statusText, text, response.headers.get("Content-Type"));
}

// An upload with its progress (fetch cannot report an upload's progress; XMLHttpRequest can).
function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [key, value] of Object.entries(authHeaders())) xhr.setRequestHeader(key, value);
    xhr.upload.addEventListener("progress", (e) => e.lengthComputable && onProgress(e.loaded, e.total));
    xhr.addEventListener("load", () => {
      try {
        resolve(readAnswer(xhr.status, xhr.statusText, xhr.responseText, xhr.getResponseHeader("Content-Type")));
      } catch (err) {
        reject(err);
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError("Could not reach the service (the upload failed).", 0)));
    xhr.send(form);
  });
}

function endpointPath(suffix = "") {
  return `/${encodeURIComponent(state.name)}${suffix}`;
}

// --- small helpers for the page ------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function showError(err) {
  const message = err instanceof Error ? err.message : String(err);
  $("error-text").textContent = message;
  $("error").hidden = false;
  announce(message);
}

function hideError() {
  $("error").hidden = true;
}

function announce(message) {
  $("status").textContent = message;
}

function formatTime(iso) {
  if (!iso) return "never";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

function formatValue(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

function sameOrigin(url) {
  try {
    return new URL(url, location.href).origin === location.origin;
  } catch {
    return false;
  }
}

// Show an image. Result URLs work without a header (signed when the service has a query token);
// anything else from this service that refuses the <img> is fetched with the token and shown
// from a blob: URL. Resolves to whether the image loaded.
function showImage(img, url, blobs = state.blobs) {
  return new Promise((resolve) => {
    let fetched = false;
    img.addEventListener("load", () => resolve(true));
    img.addEventListener("error", async () => {
      if (fetched || !state.token || !sameOrigin(url)) {
        img.classList.add("broken");
        resolve(false);
        return;
      }
      fetched = true;
      try {
        const response = await fetch(url, { headers: authHeaders() });
        if (!response.ok) throw new Error(String(response.status));
        const blobUrl = URL.createObjectURL(await response.blob());
        blobs.push(blobUrl);
        img.src = blobUrl;
      } catch {
        img.classList.add("broken");
        resolve(false);
      }
    });
    img.src = url;
  });
}

// --- endpoints ------------------------------------------------------------------------------------

async function loadEndpoints() {
  let data;
  try {
    data = await api("/endpoints");
  } catch (err) {
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

async function refreshEndpoint() {
  try {
    const data = await api("/endpoints");
    state.endpoints = data.endpoints;
    const info = state.endpoints.find((e) => e.name === state.name);
    if (info) applyInfo(info);
  } catch (err) {
    showError(err);
  }
}

async function chooseEndpoint(name, userChoice = true) {
  const changed = name !== state.name;
  state.name = name;
  if (userChoice) history.replaceState(null, "", `?endpoint=${encodeURIComponent(name)}`);
  if (changed) {
    state.labels.clear();
    state.fields.clear();
    state.view = state.photo ? { kind: "photo" } : null;
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

// --- filters ----------------------------------------------------------------------------------------

let conditionCount = 0;

function addCondition() {
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

function whereFilter() {
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

function searchParams() {
  const params = new URLSearchParams();
  const k = $("k").value.trim();
  if (k) params.set("k", k);
  for (const label of state.labels) params.append("label", label);
  const where = whereFilter();
  if (where) params.set("where", JSON.stringify(where));
  return params;
}

// --- search -----------------------------------------------------------------------------------------

let refreshTimer = null;

function refreshView() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(runView, 150);
}

async function runView() {
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

function setPhoto(file) {
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

function clearGrid() {
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

async function showSimilar(item) {
  state.view = { kind: "similar", item };
  clearTimeout(refreshTimer);
  await runView();
  $("results-title").scrollIntoView({ block: "nearest" });
  $("results-title").focus(); // the grid was redrawn: a keyboard user goes on from its title
}

// --- one item: its photos, similar items, edit, delete --------------------------------------------

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

async function openItem(item) {
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

async function saveEdit(event) {
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

function armDelete() {
  $("item-delete").hidden = true;
  $("item-delete-confirm").hidden = false;
  $("item-delete-confirm").focus();
}

async function deleteItem() {
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
async function afterChange() {
  await Promise.all([refreshEndpoint(), loadVersions()]);
  if (state.view) {
    clearTimeout(refreshTimer);
    await runView();
  }
}

// --- training and adding items -----------------------------------------------------------------------

function jobStage(text, done, total) {
  $("job").hidden = false;
  $("job-stage").textContent = text;
  const bar = $("job-progress");
  bar.max = total > 0 ? total : 1;
  bar.value = Math.min(done, bar.max);
}

async function startJob(what, path, form) {
  hideError();
  const seq = ++state.jobSeq; // the panel follows the newest job; older loops stop drawing
  const name = state.name;
  const job = $("job");
  job.dataset.status = "uploading";
  $("job-title").textContent = `${what} ${name}`;
  $("job-result").replaceChildren();
  jobStage("Uploading…", 0, 1);
  job.scrollIntoView({ block: "nearest" });
  let created;
  try {
    created = await upload(path, form, (loaded, total) =>
      jobStage(`Uploading: ${Math.round((100 * loaded) / total)}%`, loaded, total),
    );
  } catch (err) {
    if (seq !== state.jobSeq) return;
    job.dataset.status = "failed";
    jobStage("The upload was refused.", 0, 1);
    showError(err);
    return;
  }
  await followJob(name, created.job_id, seq);
}

async function followJob(name, jobId, seq) {
  const job = $("job");
  for (;;) {
    let status;
    try {
      status = await api(`/${encodeURIComponent(name)}/jobs/${encodeURIComponent(jobId)}`);
      if (seq !== state.jobSeq) return; // a newer job took the panel
    } catch (err) {
      if (seq !== state.jobSeq) return;
      showError(err);
      if (err.status >= 400 && err.status < 500) {
        job.dataset.status = "unknown"; // gone, or no longer ours to see: asking again will not help
        jobStage(`Cannot follow the job: ${err.message}`, 0, 1);
        return;
      }
      await new Promise((r) => setTimeout(r, 2000)); // the service or the network: try again
      continue;
    }
    job.dataset.status = status.status;
    if (status.status === "succeeded") {
      jobStage(`Done: published version ${status.version}`, 1, 1);
      renderJobResult(status);
      announce(`${name}: published version ${status.version}.`);
      if (name === state.name) await afterChange();
      return;
    }
    if (status.status === "failed") {
      jobStage(`Failed: ${status.error}`, 0, 1);
      renderJobResult(status);
      showError(status.error || "The job failed.");
      return;
    }
    const stage = status.stage ? `${status.stage} ${status.done}/${status.total}` : "waiting for a worker";
    jobStage(`${status.status}: ${stage}`, status.done, status.total);
    await new Promise((r) => setTimeout(r, 400));
  }
}

function renderJobResult(status) {
  const parts = [];
  const counts = status.counts || {};
  const summary = [];
  if (counts.images !== undefined) summary.push(`${counts.images} images`);
  if (counts.labels) summary.push(`${Object.keys(counts.labels).length} labels`);
  if (counts.embedded !== undefined) summary.push(`${counts.embedded} embedded, ${counts.reused || 0} reused`);
  if (Array.isArray(counts.items) && counts.items.length) summary.push(`items added or replaced: ${counts.items.join(", ")}`);
  if (summary.length) parts.push(el("p", { class: "job-counts", text: summary.join(" · ") }));

  const skipped = status.skipped || [];
  parts.push(el("h4", { text: skipped.length ? `Skipped files (${skipped.length})` : "No file was skipped." }));
  if (skipped.length) {
    parts.push(
      el(
        "div",
        { class: "table-scroll" },
        el(
          "table",
          { class: "skipped" },
          el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "File" }), el("th", { scope: "col", text: "Why" }))),
          el("tbody", {}, skipped.map((s) => el("tr", {}, el("td", { text: s.name }), el("td", { text: s.reason })))),
        ),
      ),
    );
  }

  const evaluation = status.evaluation || {};
  if (evaluation.frozen) {
    const metrics = ["precision@1", "precision@10", "map@10"];
    const columns = ["frozen", "fine_tuned"].filter((c) => evaluation[c]);
    parts.push(
      el("h4", { text: `Hold-out metrics (${evaluation.holdout_queries} queries)` }),
      el(
        "div",
        { class: "table-scroll" },
        el(
          "table",
          { class: "metrics" },
          el(
            "thead",
            {},
            el("tr", {}, el("th", { scope: "col", text: "Metric" }), columns.map((c) => el("th", { scope: "col", text: c === "frozen" ? "Frozen backbone" : "Fine-tuned head" }))),
          ),
          el(
            "tbody",
            {},
            metrics.map((m) =>
              el("tr", {}, el("th", { scope: "row", text: m }), columns.map((c) => el("td", { text: Number(evaluation[c][m]).toFixed(3) }))),
            ),
          ),
        ),
      ),
      el("p", { class: "muted", text: `Kept: ${evaluation.kept === "fine_tuned" ? "the fine-tuned head" : "the frozen backbone"} (${evaluation.decided_by}).` }),
    );
  } else if (status.status === "succeeded") {
    parts.push(el("p", { class: "muted", text: "No hold-out metrics: no head was trained for this version." }));
  }
  $("job-result").replaceChildren(...parts);
}

function submitTrain(event) {
  event.preventDefault();
  const file = $("train-file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("fine_tune", $("train-fine-tune").value);
  form.append("file", file, file.name);
  startJob("Training", endpointPath("/train"), form);
}

function isZip(file) {
  return /\.zip$/i.test(file.name) || file.type === "application/zip" || file.type === "application/x-zip-compressed";
}

function submitAdd(event) {
  event.preventDefault();
  const files = [...$("add-files").files];
  if (!files.length) return;
  const form = new FormData();
  if (files.length === 1 && isZip(files[0])) {
    form.append("file", files[0], files[0].name);
  } else {
    for (const file of files) form.append("image", file, file.name);
    const label = $("add-label").value.trim();
    const name = $("add-name").value.trim();
    const metadata = $("add-metadata").value.trim();
    if (label) form.append("label", label);
    if (name) form.append("name", name);
    if (metadata) form.append("metadata", metadata);
  }
  startJob("Adding to", endpointPath("/items"), form);
}

// --- versions ---------------------------------------------------------------------------------------

async function loadVersions() {
  const name = state.name;
  let data;
  try {
    data = await api(endpointPath("/versions"));
  } catch (err) {
    showError(err);
    return;
  }
  if (name !== state.name) return;
  renderVersions(data);
}

function renderVersions(data) {
  const rows = [...data.versions].reverse(); // newest first
  const body = $("versions-body");
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: "5", class: "muted", text: "No version yet." })));
    return;
  }
  body.replaceChildren(
    ...rows.map((v) =>
      el(
        "tr",
        { "data-version": v.version, class: v.current ? "current" : "" },
        el("td", {}, el("code", { text: v.version })),
        el("td", { text: v.count === null || v.count === undefined ? "?" : String(v.count) }),
        el("td", { text: formatTime(v.created_at) }),
        el("td", { text: v.fine_tuned ? "fine-tuned" : "frozen" }),
        el(
          "td",
          { class: "actions" },
          v.current
            ? el("span", { class: "badge status-ready", text: "serving" })
            : [
                el("button", { type: "button", text: "Roll back", "aria-label": `Roll back to ${v.version}`, onclick: () => rollback(v.version) }),
                el("button", {
                  type: "button",
                  class: "danger",
                  text: "Delete",
                  "aria-label": `Delete version ${v.version}`,
                  onclick: (e) => deleteVersion(e.currentTarget, v.version),
                }),
              ],
        ),
      ),
    ),
  );
}

async function rollback(version) {
  hideError();
  try {
    const data = await api(endpointPath("/rollback"), { method: "POST", json: { version } });
    renderVersions(data);
    announce(`${state.name} serves ${version} again.`);
    await afterChange();
  } catch (err) {
    showError(err);
  }
}

async function deleteVersion(button, version) {
  if (button.dataset.armed !== "yes") {
    button.dataset.armed = "yes";
    button.textContent = "Really delete?";
    button.addEventListener(
      "blur",
      () => {
        button.dataset.armed = "";
        button.textContent = "Delete";
      },
      { once: true },
    );
    return;
  }
  hideError();
  try {
    renderVersions(await api(endpointPath(`/versions/${encodeURIComponent(version)}`), { method: "DELETE" }));
    announce(`Deleted version ${version}.`);
  } catch (err) {
    showError(err);
  }
}

// --- wiring -----------------------------------------------------------------------------------------

function firstImage(items) {
  for (const item of items || []) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  return null;
}

function wire() {
  $("error-close").addEventListener("click", hideError);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.token = $("token").value.trim();
    hideError();
    loadEndpoints();
  });
  $("endpoint").addEventListener("change", (e) => chooseEndpoint(e.target.value));
  $("choose-photo").addEventListener("click", () => $("photo-file").click());
  $("take-photo").addEventListener("click", () => $("photo-camera").click());
  for (const id of ["photo-file", "photo-camera"]) {
    $(id).addEventListener("change", (e) => {
      setPhoto(e.target.files[0]);
      e.target.value = "";
    });
  }
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = [...(e.dataTransfer.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) setPhoto(file);
    else showError("Drop an image file.");
  });
  document.addEventListener("paste", (e) => {
    const file = firstImage(e.clipboardData && e.clipboardData.items);
    if (file) {
      e.preventDefault();
      setPhoto(file);
    }
  });
  $("k").addEventListener("change", () => {
    state.kTouched = true;
    refreshView();
  });
  $("add-condition").addEventListener("click", addCondition);
  $("back-to-photo").addEventListener("click", () => {
    state.view = { kind: "photo" };
    clearTimeout(refreshTimer);
    runView();
  });
  $("item-close").addEventListener("click", () => $("item-dialog").close());
  $("item-dialog").addEventListener("close", () => {
    state.item = null;
  });
  $("item-similar").addEventListener("click", () => {
    const item = state.item;
    $("item-dialog").close();
    showSimilar(item);
  });
  $("item-delete").addEventListener("click", armDelete);
  $("item-delete-confirm").addEventListener("click", deleteItem);
  $("edit-form").addEventListener("submit", saveEdit);
  $("train-form").addEventListener("submit", submitTrain);
  $("add-form").addEventListener("submit", submitAdd);
}

wire();
loadEndpoints();
