// Small helpers for the page: building elements, the error banner and status line, formats, images.

import { state } from "./state.js";
import { authHeaders } from "./api.js";

export const $ = (id) => document.getElementById(id);

export function el(tag, attrs = {}, ...children) {
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

export function showError(err) {
  const message = err instanceof Error ? err.message : String(err);
  $("error-text").textContent = message;
  $("error").hidden = false;
  announce(message);
}

export function hideError() {
  $("error").hidden = true;
}

export function announce(message) {
  $("status").textContent = message;
}

export function formatTime(iso) {
  if (!iso) return "never";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

export function formatValue(value) {
  return typeof value === "string" ? value : JSON.stringify(value);
}

export function sameOrigin(url) {
  try {
    return new URL(url, location.href).origin === location.origin;
  } catch {
    return false;
  }
}

// Show an image. Result URLs work without a header (signed when the service has a query token);
// anything else from this service that refuses the <img> is fetched with the token and shown
// from a blob: URL. Resolves to whether the image loaded.
export function showImage(img, url, blobs = state.blobs) {
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
