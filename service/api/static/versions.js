// The versions table: the endpoint's versions, roll back, delete.

import { state } from "./state.js";
import { api, endpointPath } from "./api.js";
import { $, announce, el, formatTime, hideError, showError } from "./dom.js";
import { afterChange } from "./item.js";

export async function loadVersions() {
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
    body.replaceChildren(el("tr", {}, el("td", { colspan: "7", class: "muted", text: "No version yet." })));
    return;
  }
  body.replaceChildren(
    ...rows.map((v) =>
      el(
        "tr",
        { "data-version": v.version, class: v.current ? "current" : "" },
        el("td", {}, el("code", { text: v.version })),
        // What made it: train, add, delete, edit, compact (segments merged), migrate.
        el("td", { text: v.change || "train" }),
        el("td", { text: v.count === null || v.count === undefined ? "?" : String(v.count) }),
        el("td", { text: v.segments === undefined ? "" : String(v.segments) }),
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
