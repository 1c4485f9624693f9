// MoEFlow gateway status page: polls /status/data and draws models, instances and three SVG
// charts. No framework, no external resources; every string from the server goes through
// textContent or an attribute, never innerHTML.
"use strict";

(() => {
  const POLL_MS = 1000;
  const MAX_POINTS = 120; // intervals shown (about two minutes at one poll per second)
  const SVG_NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#2563eb", "#d9480f", "#2f9e44", "#9c36b5", "#0c8599", "#e67700"];
  const CHARTS = [
    { metric: "ttft_ms", title: "Time to first token", unit: "ms", combine: "mean" },
    { metric: "tpot_ms", title: "Time per output token", unit: "ms", combine: "mean" },
    { metric: "tokens_per_s", title: "Generated tokens/s", unit: "tok/s", combine: "sum" },
  ];
  const H = 140, LEFT = 44, RIGHT = 8, TOP = 8, BOTTOM = 18;

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  function fmt(value, unit) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    const digits = Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 10 ? 1 : 2;
    return `${value.toFixed(digits)} ${unit}`;
  }

  function colorOf(index) {
    return COLORS[index % COLORS.length];
  }

  function makeChart(spec) {
    const figure = el("figure", { class: "chart", "data-metric": spec.metric,
                                  "data-points": 0, "data-max": 0 });
    const caption = el("figcaption");
    caption.append(el("span", {}, spec.title), el("span", { class: "latest" }, "–"));
    const svg = svgEl("svg", { viewBox: `0 0 600 ${H}`, role: "img", "aria-label": spec.title });
    const legend = el("div", { class: "legend" });
    figure.append(caption, svg, legend);
    return figure;
  }

  function drawChart(figure, spec, series) {
    const names = Object.keys(series.models);
    const all = series.t.length;
    const start = Math.max(0, all - MAX_POINTS);
    const times = series.t.slice(start);
    let max = 0, numPoints = 0;
    const lines = names.map((name) => {
      const values = (series.models[name][spec.metric] || []).slice(start);
      for (const v of values) {
        if (v !== null) { numPoints += 1; max = Math.max(max, v); }
      }
      return values;
    });
    const yMax = max > 0 ? max * 1.1 : 1;
    const svg = figure.querySelector("svg");
    // One SVG unit per CSS pixel, so labels keep their size whatever the layout width.
    const W = Math.max(240, Math.round(svg.getBoundingClientRect().width) || 600);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    // Newest interval at the right edge; the chart scrolls left as intervals arrive.
    const step = (W - LEFT - RIGHT) / (MAX_POINTS - 1);
    const x = (i) => W - RIGHT - (times.length - 1 - i) * step;
    const y = (v) => TOP + (1 - v / yMax) * (H - TOP - BOTTOM);

    svg.replaceChildren();
    for (const frac of [0, 0.5, 1]) {
      const gy = TOP + frac * (H - TOP - BOTTOM);
      svg.append(svgEl("line", { class: "grid", x1: LEFT, x2: W - RIGHT, y1: gy, y2: gy }));
      const label = svgEl("text", { class: "axis-label", x: LEFT - 4, y: gy + 3,
                                    "text-anchor": "end" });
      label.textContent = (yMax * (1 - frac)).toFixed(yMax >= 10 ? 0 : 1);
      svg.append(label);
    }
    const span = times.length > 1 ? times[times.length - 1] - times[0] : 0;
    const axis = svgEl("text", { class: "axis-label", x: W - RIGHT, y: H - 4,
                                 "text-anchor": "end" });
    axis.textContent = span > 0 ? `last ${Math.round(span)} s (${spec.unit})` : spec.unit;
    svg.append(axis);

    lines.forEach((values, index) => {
      const color = colorOf(index);
      let d = "", pen = false;
      values.forEach((v, i) => {
        if (v === null) { pen = false; return; }
        d += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)} `;
        pen = true;
        svg.append(svgEl("circle", { cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: 2.5,
                                     fill: color, "data-model": names[index] }));
      });
      const path = svgEl("path", { class: "series", d: d.trim(), stroke: color,
                                   "data-model": names[index] });
      svg.append(path);
    });

    // The latest interval that has a value for any model.
    let latest = null;
    for (let i = times.length - 1; i >= 0 && latest === null; i -= 1) {
      const here = lines.map((values) => values[i]).filter((v) => v !== null && v !== undefined);
      if (here.length === 0) continue;
      const total = here.reduce((a, b) => a + b, 0);
      latest = spec.combine === "sum" ? total : total / here.length;
    }
    figure.querySelector(".latest").textContent = `latest ${fmt(latest, spec.unit)}`;
    figure.setAttribute("data-points", numPoints);
    figure.setAttribute("data-max", max);
    figure.setAttribute("data-last", latest === null ? "" : latest);

    const legend = figure.querySelector(".legend");
    legend.replaceChildren(...names.map((name, index) => {
      const item = el("span", {});
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = colorOf(index);
      item.append(swatch, document.createTextNode(name));
      return item;
    }));
  }

  function instanceRow(role, instance) {
    const tr = el("tr", { "data-instance-url": instance.url, "data-state": instance.state,
                          "data-role": role });
    const state = el("td");
    state.append(el("span", { class: `badge ${instance.state}` }, instance.state));
    tr.append(
      el("td", {}, role),
      el("td", {}, instance.rank || instance.instance_id || "–"),
      el("td", {}, instance.url),
      state,
      el("td", { class: "num" }, instance.num_waiting),
      el("td", { class: "num" }, instance.num_running),
      el("td", { class: "num" }, instance.num_in_flight),
      el("td", { class: "num" }, `${(100 * instance.kv_cache_usage_ratio).toFixed(1)} %`),
    );
    return tr;
  }

  function modelSection(model) {
    const section = el("section", { class: "model", "data-model": model.name,
                                    "data-state": model.state });
    const h2 = el("h2", {}, model.name);
    h2.append(el("span", { class: `badge ${model.state}` }, model.state));
    const numInstances = model.roles.reduce((n, r) => n + r.instances.length, 0);
    const roles = model.roles.map((r) => `${r.role} ${r.num_healthy}/${r.instances.length}`);
    const meta = el("p", { class: "meta" },
      `${model.architecture} · context ${model.max_model_len} tokens · ${numInstances} ` +
      `instance(s): ${roles.join(", ")} · ${model.totals.requests} requests, ` +
      `${model.totals.generation_tokens} tokens generated`);
    const table = el("table");
    const head = el("tr");
    for (const title of ["role", "rank", "instance", "state", "waiting", "running",
                         "in flight", "KV cache"]) {
      head.append(el("th", { scope: "col" }, title));
    }
    const thead = el("thead");
    thead.append(head);
    const tbody = el("tbody");
    for (const role of model.roles) {
      for (const instance of role.instances) tbody.append(instanceRow(role.role, instance));
    }
    table.append(thead, tbody);
    section.append(h2, meta, table);
    return section;
  }

  const charts = CHARTS.map((spec) => ({ spec, figure: makeChart(spec) }));

  function render(data) {
    const chartsRoot = document.getElementById("charts");
    if (chartsRoot.childElementCount === 0) chartsRoot.append(...charts.map((c) => c.figure));
    for (const { spec, figure } of charts) drawChart(figure, spec, data.series);
    document.getElementById("models").replaceChildren(...data.models.map(modelSection));
    const when = new Date(data.now_unix * 1000).toLocaleTimeString();
    const names = data.models.map((m) => m.name).join(", ") || "no model yet";
    document.getElementById("summary").textContent =
      `${data.models.length} model(s): ${names} · ${data.gateway.requests_in_flight}/` +
      `${data.gateway.max_in_flight_requests} requests in flight · updated ${when}`;
  }

  async function poll() {
    const problem = document.getElementById("problem");
    try {
      const response = await fetch("/status/data", { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
      problem.hidden = true;
      document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
    } catch (error) {
      problem.textContent = `cannot reach the gateway: ${error.message}`;
      problem.hidden = false;
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
