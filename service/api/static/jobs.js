// Training and adding items: the uploads, and the job panel that follows them to the end.

import { state } from "./state.js";
import { api, endpointPath, upload } from "./api.js";
import { $, announce, el, hideError, showError } from "./dom.js";
import { afterChange } from "./item.js";

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

// A running job's line: its stage and count; a sharded job's shards and rate over every worker.
function describeProgress(status) {
  if (!status.stage) return "waiting for a worker";
  let text = `${status.stage} ${status.done}/${status.total}`;
  const shards = status.shards || {};
  if (shards.total && status.stage === "embed") text += ` · shards ${shards.done || 0}/${shards.total}`;
  if (status.rate) text += ` · ${Math.round(status.rate)} images/s`;
  return text;
}

async function cancelJob(name, jobId) {
  const button = $("job-cancel");
  button.disabled = true;
  try {
    await api(`/${encodeURIComponent(name)}/jobs/${encodeURIComponent(jobId)}`, { method: "DELETE" });
    announce("Cancelling the job: it stops at its next batch.");
  } catch (err) {
    showError(err);
  }
}

async function followJob(name, jobId, seq) {
  const job = $("job");
  const cancel = $("job-cancel");
  cancel.hidden = false;
  cancel.disabled = false;
  cancel.onclick = () => cancelJob(name, jobId);
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
    if (["succeeded", "failed", "cancelled"].includes(status.status)) cancel.hidden = true;
    if (status.status === "cancelled") {
      jobStage("Cancelled: nothing was published.", 0, 1);
      announce(`${name}: the job was cancelled.`);
      return;
    }
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
    jobStage(`${status.status}: ${describeProgress(status)}`, status.done, status.total);
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

export function submitTrain(event) {
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

export function submitAdd(event) {
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
