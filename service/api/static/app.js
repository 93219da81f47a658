// The page's entry module: wires the page's controls to the modules beside it, then loads the endpoints.
//
// Everything the page shows comes from the service's JSON routes (docs/API.md). No framework and no
// build step: plain ES modules, served as they are from /static/. The DOM is built from elements and
// text only, never from markup (item names and metadata come from uploaded zips); the page's CSP
// enforces it (Trusted Types).

import { state } from "./state.js";
import { $, hideError, showError } from "./dom.js";
import { chooseEndpoint, loadEndpoints } from "./endpoints.js";
import { addCondition } from "./filters.js";
import { cancelRefresh, refreshView, runView, setPhoto, showSimilar } from "./search.js";
import { armDelete, deleteItem, saveEdit } from "./item.js";
import { submitAdd, submitTrain } from "./jobs.js";
import { findDuplicates } from "./duplicates.js";

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
    cancelRefresh();
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
  $("dup-form").addEventListener("submit", findDuplicates);
  $("add-form").addEventListener("submit", submitAdd);
}

wire();
loadEndpoints();
