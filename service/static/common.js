// Shared by both pages: requests to /v1 with the API key, asked for on a 401 and kept in sessionStorage only.
"use strict";

const debias = (() => {
  const KEY = "debias-api-key";
  let pendingKey = null; // one prompt for every request that got a 401 meanwhile

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      // through the CSSOM: the page's Content-Security-Policy blocks style attributes set as markup
      else if (k === "style") node.style.cssText = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function svg(tag, attrs = {}, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const c of children) if (c) node.append(c);
    return node;
  }

  function askForKey(refused) {
    if (pendingKey) return pendingKey;
    const form = document.getElementById("key-form");
    const input = document.getElementById("api-key");
    document.getElementById("key-message").textContent = refused
      ? "That API key was refused. Enter the key of this server:"
      : "This server needs an API key:";
    form.hidden = false;
    input.value = "";
    input.focus();
    pendingKey = new Promise((resolve) => {
      form.onsubmit = (ev) => {
        ev.preventDefault();
        const key = input.value.trim();
        if (!key) return;
        sessionStorage.setItem(KEY, key);
        form.hidden = true;
        pendingKey = null;
        showForget();
        resolve(key);
      };
    });
    return pendingKey;
  }

  function showForget() {
    const b = document.getElementById("forget-key");
    if (b) b.hidden = !sessionStorage.getItem(KEY);
  }

  // fetch() with the stored key; on 401 asks for the key and tries again with it.
  async function api(path, options = {}) {
    for (;;) {
      const key = sessionStorage.getItem(KEY);
      const headers = new Headers(options.headers || {});
      if (key) headers.set("X-API-Key", key);
      const response = await fetch(path, { ...options, headers });
      if (response.status !== 401) return response;
      if (key) { sessionStorage.removeItem(KEY); showForget(); }
      await askForKey(Boolean(key));
    }
  }

  // The service's error body {error, message, files} as one sentence.
  async function errorText(response) {
    try {
      const body = await response.json();
      return `${response.status}: ${body.message || body.error || response.statusText}`;
    } catch (_) {
      return `${response.status}: ${response.statusText}`;
    }
  }

  function fmt(x, digits = 4) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    if (typeof x !== "number") return String(x);
    if (Number.isInteger(x)) return String(x);
    const a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
    return x.toPrecision(digits).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
  }

  document.addEventListener("DOMContentLoaded", () => {
    const b = document.getElementById("forget-key");
    if (b) b.addEventListener("click", () => { sessionStorage.removeItem(KEY); showForget(); });
    showForget();
  });

  return { api, el, svg, errorText, fmt };
})();
