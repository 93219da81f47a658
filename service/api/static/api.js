// Talking to the service: JSON calls and uploads with the token, and its errors as ApiError.

import { state } from "./state.js";

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

export function authHeaders() {
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

export async function api(path, { method = "GET", json, body } = {}) {
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
export function upload(path, form, onProgress) {
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

export function endpointPath(suffix = "") {
  return `/${encodeURIComponent(state.name)}${suffix}`;
}
