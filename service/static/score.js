// The scoring page: files -> POST /v1/score?heatmap=true -> one card per file; the model card from /v1/model.
"use strict";

(() => {
  const { api, el, errorText, fmt } = debias;
  let maxFiles = 16; // replaced by the server's limit once the model card arrives

  function cardFor(file) {
    const url = URL.createObjectURL(file);
    const thumb = el("img", { class: "thumb", alt: "", src: url });
    // The object URL pins the whole file in memory: release it once the thumbnail is decoded (or failed to be).
    thumb.addEventListener("load", () => URL.revokeObjectURL(url));
    thumb.addEventListener("error", () => {
      URL.revokeObjectURL(url);
      thumb.replaceWith(el("div", { class: "thumb no-preview", text: "no preview" }));
    });
    const badge = el("span", { class: "badge pending", text: "scoring…" });
    const body = el("div", { class: "body" },
      el("div", { class: "head" }, el("span", { class: "name", text: file.name }), badge));
    const node = el("article", { class: "result state-pending", "data-filename": file.name }, thumb, body);
    document.getElementById("results").append(node);
    return { file, node, body, badge };
  }

  function showScore(item, res) {
    item.node.className = "result state-done";
    item.badge.className = `badge ${res.is_novel ? "novel" : "typical"}`;
    item.badge.textContent = res.is_novel ? "novel" : "typical";
    item.badge.title = res.is_novel
      ? "p-value at or below the target false-positive rate: unlike the training data"
      : "p-value above the target false-positive rate: like the training data";
    const metric = (k, v, digits, cls) => el("div", {}, el("span", { class: "k", text: k }),
      el("span", { class: `v ${cls}`, "data-value": String(v), text: fmt(v, digits) }));
    item.body.append(el("div", { class: "metrics" },
      metric("novelty", res.novelty, 4, "novelty"),
      metric("p-value", res.p_value, 3, "p-value"),
      metric("rarity", res.rarity, 4, "rarity"),
      metric("recon. error", res.recon_error, 3, "recon-error")));
    if (res.driver) {
      const names = { posterior_knn: "latent distance to the nearest training images", recon_error: "reconstruction error",
                      pixel_density: "pixel values unusual for their place",
                      embedding_knn: "distance to the nearest training images in the contrastive features" };
      const z = res.statistics || {};
      const parts = Object.keys(z).map((k) => `${names[k] || k} z = ${fmt(z[k], 2)}`);
      item.body.append(el("p", { class: "driver", "data-driver": res.driver,
        text: `Driven by the ${names[res.driver] || res.driver} (${parts.join("; ")}).` }));
    }
    if (res.top_dims && res.top_dims.length) {
      const share = (d) => (d.distance_share === null || d.distance_share === undefined ? 0 : d.distance_share);
      const rows = res.top_dims.map((d) => el("tr", {},
        el("td", { text: `z${d.dim}` }),
        el("td", { text: d.distance_share === null || d.distance_share === undefined ? "–" : `${fmt(100 * share(d), 1)} %` }),
        el("td", {}, el("span", { class: "tailbar", style: `width:${Math.round(60 * Math.min(1, share(d)))}px` })),
        el("td", { text: fmt(d.value, 3) })));
      item.body.append(el("div", { class: "muted", text: "Latent dimensions behind the distance (share of the squared distance to the nearest training images)" }),
        el("table", { class: "dims" },
          el("thead", {}, el("tr", {}, el("th", { text: "dim" }), el("th", { text: "share" }), el("th"), el("th", { text: "value" }))),
          el("tbody", {}, ...rows)));
    }
    if (res.heatmap_png) {
      item.body.append(el("figure", { class: "heatmap" },
        el("img", { src: `data:image/png;base64,${res.heatmap_png}`, alt: `reconstruction error of ${item.file.name}` }),
        el("figcaption", { text: "input · reconstruction · squared error (fixed scale)" })));
    }
  }

  function showError(item, message) {
    item.node.className = "result state-error";
    item.badge.className = "badge error";
    item.badge.textContent = "error";
    item.body.append(el("p", { class: "error-text", text: message }));
  }

  // One request for the chunk. In a 200, each result is a score or carries its own error; when no file could be
  // scored the server answers 4xx naming every file; 503 (busy) is retried after its Retry-After.
  async function scoreChunk(items) {
    let pending = items;
    let retries = 0;
    while (pending.length) {
      const form = new FormData();
      for (const it of pending) form.append("files", it.file, it.file.name);
      let response;
      try {
        response = await api("/v1/score?heatmap=true", { method: "POST", body: form });
      } catch (err) {
        pending.forEach((it) => showError(it, `network error: ${err.message}`));
        return;
      }
      if (response.ok) {
        const body = await response.json();
        body.results.forEach((res, i) => {
          if (res.error) showError(pending[i], `${res.error.status}: ${res.error.reason}`);
          else showScore(pending[i], res);
        });
        return;
      }
      if (response.status === 503 && retries < 5) {
        retries += 1;
        const wait = Number(response.headers.get("Retry-After")) || 1;
        await new Promise((resolve) => setTimeout(resolve, 1000 * wait));
        continue;
      }
      let body = null;
      try { body = await response.clone().json(); } catch (_) { /* not JSON */ }
      if (body && body.files && body.files.length && response.status < 500) {
        const bad = new Set(body.files.map((f) => f.index));
        body.files.forEach((f) => showError(pending[f.index], `${response.status}: ${f.reason}`));
        pending = pending.filter((_, i) => !bad.has(i));
      } else if (pending.length > 1 && response.status === 413) {
        for (const it of pending) await scoreChunk([it]); // together too large; each alone may fit
        return;
      } else {
        const text = await errorText(response);
        pending.forEach((it) => showError(it, text));
        return;
      }
    }
  }

  async function scoreFiles(files) {
    const items = Array.from(files).map(cardFor);
    for (let i = 0; i < items.length; i += maxFiles) await scoreChunk(items.slice(i, i + maxFiles));
  }

  function cardRow(dl, key, value) {
    let text = fmt(value);
    if (Array.isArray(value)) text = value.length ? value.join(", ") : "(all rows)";
    else if (value && typeof value === "object") text = JSON.stringify(value);
    dl.append(el("dt", { text: key }), el("dd", { text }));
  }

  async function loadModelCard() {
    const status = document.getElementById("card-status");
    const dl = document.getElementById("card-body");
    for (let attempt = 0; ; attempt++) {
      const response = await api("/v1/model");
      if (response.status === 503 && attempt < 120) {
        status.textContent = "The model is loading…";
        await new Promise((r) => setTimeout(r, 1000));
        continue;
      }
      if (!response.ok) { status.textContent = await errorText(response); status.className = "error-text"; return; }
      const card = await response.json();
      maxFiles = card.limits.max_files || maxFiles;
      status.textContent = `Run “${card.run}”, model ${card.model_sha256}, debias ${card.debias_version}`;
      dl.replaceChildren();
      dl.append(el("div", { class: "section", text: "Trained on" }));
      const t = card.trained_on || {};
      for (const k of ["source", "where", "n_images", "n", "fingerprint"]) if (k in t) cardRow(dl, k, t[k]);
      cardRow(dl, "image size", `${card.image_size} px, ${card.channels} channel${card.channels > 1 ? "s" : ""}`);
      cardRow(dl, "latent dims", card.latent_dim);
      dl.append(el("div", { class: "section", text: "Novelty decision" }));
      cardRow(dl, "target false-positive rate", card.target_fpr);
      cardRow(dl, "novelty threshold", card.threshold);
      cardRow(dl, "calibration images", card.calibration_size);
      cardRow(dl, "scorer fitted on", `${card.fitted_on.source} (${card.fitted_on.n_fit} images)`);
      cardRow(dl, "statistics", (card.novelty.statistics || []).join(", "));
      cardRow(dl, "fitted at", card.fitted_at);
      dl.append(el("div", { class: "section", text: "Serving" }));
      cardRow(dl, "device", card.device);
      cardRow(dl, "max files / request", card.limits.max_files);
      cardRow(dl, "formats", (card.limits.formats || []).join(", "));
      return;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const input = document.getElementById("files");
    const zone = document.getElementById("dropzone");
    input.addEventListener("change", () => { if (input.files.length) scoreFiles(input.files); input.value = ""; });
    for (const ev of ["dragenter", "dragover"]) zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.add("over"); });
    for (const ev of ["dragleave", "drop"]) zone.addEventListener(ev, () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => { e.preventDefault(); if (e.dataTransfer.files.length) scoreFiles(e.dataTransfer.files); });
    loadModelCard();
  });
})();
