// Duplicates: run a report on the served version, show its groups as rows of photos, delete every
// item of a group but the one kept (one batch delete), or mark a group "not duplicates".

import { state } from "./state.js";
import { api, authHeaders } from "./api.js";
import { $, announce, el, hideError, showError, showImage } from "./dom.js";
import { afterChange } from "./item.js";

const path = (rest = "") => `/${encodeURIComponent(state.name)}/duplicates${rest}`;
let reportSeq = 0;
let dupBlobs = [];

// Another endpoint chosen: its own reports only.
export function resetDuplicates() {
  reportSeq++;
  $("dup-groups").replaceChildren();
  $("dup-status").textContent = "No report yet.";
  $("dup-csv").hidden = true;
}

export async function findDuplicates(event) {
  event.preventDefault();
  hideError();
  const seq = ++reportSeq;
  const name = state.name;
  const threshold = $("dup-threshold").value.trim();
  const line = $("dup-status");
  $("dup-groups").replaceChildren();
  line.textContent = "Starting the report…";
  let created;
  try {
    created = await api(path(threshold ? `?threshold=${encodeURIComponent(threshold)}` : ""), { method: "POST" });
  } catch (err) {
    line.textContent = "The report was refused.";
    showError(err);
    return;
  }
  for (;;) {
    let report;
    try {
      report = await api(`/${encodeURIComponent(name)}/duplicates/${encodeURIComponent(created.job_id)}`);
    } catch (err) {
      if (seq === reportSeq) showError(err);
      return;
    }
    if (seq !== reportSeq) return; // a newer report took the panel
    if (report.status === "succeeded") return showReport(report);
    if (report.status === "failed" || report.status === "cancelled") {
      line.textContent = `The report ${report.status}: ${report.error || ""}`;
      showError(report.error || `The report ${report.status}.`);
      return;
    }
    line.textContent = `${report.status}: ${report.stage || "waiting"} ${report.done || 0}/${report.total || 0}`;
    await new Promise((r) => setTimeout(r, 400));
  }
}

function showReport(report) {
  dupBlobs.forEach((u) => URL.revokeObjectURL(u));
  dupBlobs = [];
  const counts = report.counts || {};
  const stale = report.stale ? ` The catalogue has changed since (now ${report.current_version}).` : "";
  $("dup-status").textContent =
    `${counts.groups || 0} groups, ${counts.duplicates || 0} duplicates in version ${report.version} ` +
    `(threshold ${report.threshold}).${stale}`;
  $("dup-csv").hidden = !report.groups.length;
  $("dup-csv").onclick = () => downloadCsv(report);
  $("dup-groups").replaceChildren(...report.groups.map((group, n) => groupRow(group, n)));
  announce(`${counts.groups || 0} groups of duplicates found.`);
}

function groupRow(group, n) {
  const row = el("li", { class: "dup-group", "data-group": String(n) });
  const keepName = `dup-keep-${n}`;
  const photos = el(
    "ul",
    { class: "dup-photos" },
    group.items.map((item, i) => {
      const img = el("img", { alt: item.name, loading: "lazy" });
      showImage(img, item.image_url, dupBlobs);
      return el(
        "li",
        { class: "dup-item" },
        img,
        el("label", { class: "dup-keep" },
          el("input", { type: "radio", name: keepName, value: String(item.id), checked: i === 0 }),
          ` keep #${item.id}`),
        el("span", { class: "dup-name", text: item.name }),
        el("span", { class: "muted", text: i === 0 ? "the oldest" : `score ${item.score.toFixed(3)}` }),
      );
    }),
  );
  const result = el("p", { class: "dup-result", role: "status" });
  const confirm = el("button", { type: "button", class: "danger", hidden: true });
  const remove = el("button", { type: "button", class: "danger", text: "Delete all but the one kept" });
  const ignore = el("button", { type: "button", class: "secondary", text: "Not duplicates" });
  const others = () => {
    const kept = Number(row.querySelector(`input[name="${keepName}"]:checked`).value);
    return group.items.map((i) => i.id).filter((id) => id !== kept);
  };
  remove.addEventListener("click", () => {
    const ids = others();
    confirm.textContent = `Yes, delete ${ids.length} item${ids.length === 1 ? "" : "s"}: ${ids.map((i) => `#${i}`).join(", ")}`;
    confirm.hidden = false;
    confirm.focus();
  });
  confirm.addEventListener("click", async () => {
    confirm.hidden = true;
    const ids = others();
    try {
      const done = await api(`/${encodeURIComponent(state.name)}/items`, { method: "DELETE", json: { ids } });
      result.textContent = `Deleted ${done.items.length}: version ${done.version} has ${done.count} items.`;
      row.dataset.done = "deleted";
      remove.disabled = ignore.disabled = true;
      await afterChange();
    } catch (err) {
      result.textContent = `Nothing was deleted: ${err.message}`;
      showError(err);
    }
  });
  ignore.addEventListener("click", async () => {
    try {
      await api(path("/ignored"), { method: "POST", json: { ids: group.items.map((i) => i.id) } });
      result.textContent = "Marked as not duplicates: the next reports leave this group out.";
      row.dataset.done = "ignored";
      remove.disabled = ignore.disabled = true;
    } catch (err) {
      showError(err);
    }
  });
  const kind = group.exact ? "the same bytes" : "near-duplicates";
  row.append(
    el("h4", { text: `Group ${n + 1}: ${group.items.length} items, ${kind}` }),
    photos,
    el("div", { class: "row wrap" }, remove, confirm, ignore),
    result,
  );
  return row;
}

// The service's own CSV of the report (Accept: text/csv), saved as a file.
async function downloadCsv(report) {
  try {
    const response = await fetch(`/${encodeURIComponent(state.name)}/duplicates/${encodeURIComponent(report.id)}`, {
      headers: { ...authHeaders(), Accept: "text/csv" },
    });
    if (!response.ok) throw new Error(`The service answered ${response.status}`);
    const url = URL.createObjectURL(await response.blob());
    el("a", { href: url, download: `${state.name}-duplicates-${report.version}.csv` }).click();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  } catch (err) {
    showError(err);
  }
}
