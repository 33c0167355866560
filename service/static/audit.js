// The audit browser: summary, a sortable / filterable thumbnail table (paged server side), group charts, histograms.
"use strict";

(() => {
  const { api, el, svg, errorText, fmt } = debias;
  const FIRST = ["row", "rarity_rank", "rarity", "weight", "recon_error"];
  const PAGE = 100;
  const state = { subset: "rarest", sort: null, order: null, q: "", column: "", offset: 0, total: 0, columns: [], tags: [] };
  let requestId = 0;

  function showFailure(text) {
    document.getElementById("stats").replaceChildren(el("div", { class: "notice", text }));
  }

  function columnOrder(columns) {
    const names = columns.map((c) => c.name);
    return [...FIRST.filter((n) => names.includes(n)), ...names.filter((n) => !FIRST.includes(n))];
  }

  function renderHead() {
    const tr = el("tr", {}, el("th", { text: "image", "data-column": "" }));
    for (const name of columnOrder(state.columns)) {
      const sorted = state.sort === name ? (state.order === "asc" ? "ascending" : "descending") : "none";
      tr.append(el("th", { text: name, "data-column": name, "aria-sort": sorted, title: "Sort by " + name, onclick: () => sortBy(name) }));
    }
    document.querySelector("#rows thead").replaceChildren(tr);
  }

  function renderRows(body) {
    const numeric = new Set(state.columns.filter((c) => c.numeric).map((c) => c.name));
    const rows = body.rows.map((r) => {
      // Each thumbnail carries its group (the audit's --group-by columns) or label, and its path.
      const tag = [state.tags.map((c) => r[c]).filter((v) => v !== null && v !== undefined).join(" × "), r.path]
        .filter((v) => v).join(" · ");
      const thumb = r.thumb
        ? el("figure", { class: "thumb-cell" }, el("img", { src: r.thumb, alt: tag || `row ${r.row}`, title: tag }),
          el("figcaption", { text: tag }))
        : el("span", { class: "muted", text: "–" });
      const tr = el("tr", { "data-row": r.row }, el("td", {}, thumb));
      for (const name of columnOrder(state.columns)) {
        const v = r[name];
        tr.append(el("td", {
          class: numeric.has(name) ? "num" : null, "data-column": name, "data-value": v === null ? "" : String(v),
          text: numeric.has(name) ? fmt(v) : (v === null ? "–" : String(v)),
        }));
      }
      return tr;
    });
    document.querySelector("#rows tbody").replaceChildren(...rows);
    const end = body.offset + body.rows.length;
    document.getElementById("row-count").textContent =
      body.total ? `rows ${body.offset + 1}–${end} of ${body.total}` : "no rows match";
    document.getElementById("prev").disabled = body.offset === 0;
    document.getElementById("next").disabled = end >= body.total;
  }

  async function loadRows() {
    const id = ++requestId;
    const params = new URLSearchParams({ subset: state.subset, offset: state.offset, limit: PAGE });
    if (state.sort) params.set("sort", state.sort);
    if (state.order) params.set("order", state.order);
    if (state.q) params.set("q", state.q);
    if (state.column) params.set("column", state.column);
    const response = await api(`/v1/audit/rows?${params}`);
    if (id !== requestId) return; // a newer request (typing, clicking) has been sent meanwhile
    if (!response.ok) { document.getElementById("row-count").textContent = await errorText(response); return; }
    const body = await response.json();
    state.sort = body.sort;
    state.order = body.descending ? "desc" : "asc";
    state.total = body.total;
    renderHead();
    renderRows(body);
    document.getElementById("rows").setAttribute("data-loaded", String(id));
  }

  function sortBy(name) {
    state.order = state.sort === name && state.order === "asc" ? "desc" : "asc";
    state.sort = name;
    state.offset = 0;
    loadRows();
  }

  // Horizontal bar chart: one bar per group.
  function barChart(title, items, refLine) {
    const w = 320, rowH = 20, left = 110, right = 56, top = 4;
    const h = top + rowH * items.length + 18;
    const max = Math.max(refLine || 0, ...items.map((d) => d.value).filter(Number.isFinite)) || 1;
    const scale = (v) => ((w - left - right) * Math.max(0, v)) / max;
    const chart = svg("svg", { width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: "img", "aria-label": title });
    items.forEach((d, i) => {
      const y = top + i * rowH;
      const label = d.label.length > 16 ? d.label.slice(0, 15) + "…" : d.label;
      chart.append(svg("text", { x: left - 6, y: y + 14, "text-anchor": "end", text: label }, svg("title", { text: d.label })));
      chart.append(svg("rect", { class: d.hot ? "bar hot" : "bar", x: left, y: y + 3, width: scale(d.value), height: rowH - 6 },
        svg("title", { text: `${d.label}: ${fmt(d.value)}` })));
      chart.append(svg("text", { x: left + scale(d.value) + 4, y: y + 14, text: fmt(d.value, 3) }));
    });
    chart.append(svg("line", { class: "axis", x1: left, x2: left, y1: top, y2: h - 16 }));
    if (refLine) {
      const x = left + scale(refLine);
      chart.append(svg("line", { class: "axis", x1: x, x2: x, y1: top, y2: h - 16, "stroke-dasharray": "3 3" }));
      chart.append(svg("text", { x, y: h - 4, "text-anchor": "middle", text: `overall ${fmt(refLine, 3)}` }));
    }
    return el("div", { class: "chart" }, el("h3", { text: title }), chart);
  }

  function renderGroups(groups) {
    const box = document.getElementById("groups");
    const names = Object.keys(groups || {});
    if (!names.length) return;
    box.replaceChildren();
    for (const name of names) {
      const entries = Object.entries(groups[name]);
      const ratio = entries.map(([g, s]) => ({ label: g, value: s.weight_ratio, hot: s.weight_ratio > 1 }));
      const rarity = entries.map(([g, s]) => ({ label: g, value: s.mean_rarity, hot: false }));
      box.append(barChart(`${name}: mean weight (× overall mean)`, ratio, 1));
      box.append(barChart(`${name}: mean rarity`, rarity, null));
    }
  }

  function histogram(h) {
    const w = 150, ht = 70, pad = 2;
    const max = Math.max(...h.counts) || 1;
    const bw = (w - 2 * pad) / h.counts.length;
    const chart = svg("svg", { width: w, height: ht + 14, viewBox: `0 0 ${w} ${ht + 14}`, role: "img", "aria-label": `histogram ${h.label}` });
    h.counts.forEach((c, i) => {
      const bh = ((ht - 4) * c) / max;
      chart.append(svg("rect", { class: "bar", x: pad + i * bw + 0.5, y: ht - bh, width: Math.max(1, bw - 1), height: bh },
        svg("title", { text: `[${fmt(h.edges[i], 3)}, ${fmt(h.edges[i + 1], 3)}): ${c}` })));
    });
    chart.append(svg("line", { class: "axis", x1: 0, x2: w, y1: ht, y2: ht }));
    chart.append(svg("text", { x: 0, y: ht + 12, text: fmt(h.edges[0], 2) }));
    chart.append(svg("text", { x: w, y: ht + 12, "text-anchor": "end", text: fmt(h.edges[h.edges.length - 1], 2) }));
    return el("div", { class: "chart" }, el("h3", { text: h.label }), chart);
  }

  async function loadHistograms() {
    const box = document.getElementById("hists");
    const response = await api("/v1/audit/histograms");
    if (!response.ok) { box.replaceChildren(el("p", { class: "muted", text: await errorText(response) })); return; }
    const body = await response.json();
    box.replaceChildren(...body.histograms.map(histogram));
  }

  async function loadSummary() {
    const response = await api("/v1/audit/summary");
    if (!response.ok) { showFailure(await errorText(response)); return false; }
    const body = await response.json();
    const s = body.summary || {};
    state.columns = body.columns;
    const names = new Set(body.columns.map((c) => c.name));
    const grouped = Object.keys(s.groups || {}).filter((k) => !k.includes(" x ") && names.has(k));
    state.tags = grouped.length ? grouped : ["label"].filter((k) => names.has(k));
    document.getElementById("title").textContent = `Audit: ${s.source || "(unknown source)"}`;
    document.title = `debias · audit · ${s.source || ""}`;
    const stat = (k, v) => el("div", {}, el("div", { class: "muted", text: k }), el("strong", { text: v }));
    document.getElementById("stats").replaceChildren(
      stat("images", fmt(body.n_rows)),
      stat("skipped", fmt(s.n_skipped)),
      stat("effective sample size", s.effective_sample_size ? `${fmt(s.effective_sample_size, 4)} (${Math.round(100 * s.effective_sample_fraction)} %)` : "–"),
      stat("rarity", s.rarity_estimator || (s.density ? `histogram ${s.density.combine}` : "–")),
      stat("model", s.model || "–"));
    for (const b of document.querySelectorAll("[data-subset]")) {
      if (b.dataset.subset !== "all") b.textContent = `${b.dataset.subset === "rarest" ? "Rarest" : "Most typical"} ${body.k}`;
    }
    const select = document.getElementById("filter-column");
    for (const name of columnOrder(body.columns)) select.append(el("option", { value: name, text: `in ${name}` }));
    renderGroups(s.groups);
    return true;
  }

  document.addEventListener("DOMContentLoaded", async () => {
    for (const b of document.querySelectorAll("[data-subset]")) {
      b.addEventListener("click", () => {
        document.querySelectorAll("[data-subset]").forEach((o) => o.setAttribute("aria-pressed", String(o === b)));
        Object.assign(state, { subset: b.dataset.subset, sort: null, order: null, offset: 0 });
        loadRows();
      });
    }
    let timer = null;
    document.getElementById("filter").addEventListener("input", (e) => {
      clearTimeout(timer);
      timer = setTimeout(() => { state.q = e.target.value.trim(); state.offset = 0; loadRows(); }, 250);
    });
    document.getElementById("filter-column").addEventListener("change", (e) => {
      state.column = e.target.value; state.offset = 0; loadRows();
    });
    document.getElementById("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadRows(); });
    document.getElementById("next").addEventListener("click", () => { state.offset += PAGE; loadRows(); });
    if (await loadSummary()) await Promise.all([loadRows(), loadHistograms()]);
  });
})();
