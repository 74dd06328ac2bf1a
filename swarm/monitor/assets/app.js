// The monitor page: polls /api/v1/state and redraws. Every string from the snapshot goes into the
// DOM through textContent (never innerHTML), so peer-supplied text is shown, never interpreted.
"use strict";
(function () {
  const POLL_MS = 500;
  const COLORS = { activations: "#0969da", gradients: "#cf222e", sync: "#1a7f37", state: "#8250df" };
  const token = new URLSearchParams(location.search).get("token");
  const $ = (id) => document.getElementById(id);

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function fmtBytes(n) {
    if (n === null || n === undefined) return "-";
    const u = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
    return n.toFixed(i ? 1 : 0) + " " + u[i];
  }
  function fmtS(s) {
    if (s === null || s === undefined) return "-";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), x = s % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + x + "s";
  }
  function num(v, d) { return v === null || v === undefined ? "-" : Number(v).toFixed(d); }
  function short(id) { return id ? id.slice(0, 12) : "-"; }
  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }
  function row(cells) {
    const tr = el("tr");
    for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
    return tr;
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  // Lines over a shared x axis; `series` = [{points: [[x, y]], color, dash}]; log10 y if asked.
  function plot(svg, series, opts) {
    const W = 600, H = 220, L = 52, R = 8, T = 8, B = 22;
    const pts = series.flatMap((s) => s.points).filter((p) => isFinite(p[1]) && (!opts.log || p[1] > 0));
    svg.replaceChildren();
    if (pts.length === 0) {
      svg.appendChild(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet"));
      return;
    }
    const ty = (v) => (opts.log ? Math.log10(v) : v);
    let x0 = Math.min(...pts.map((p) => p[0])), x1 = Math.max(...pts.map((p) => p[0]));
    let y0 = Math.min(...pts.map((p) => ty(p[1]))), y1 = Math.max(...pts.map((p) => ty(p[1])));
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y1 += 0.5; y0 -= 0.5; }
    const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
    const sy = (y) => T + (1 - (ty(y) - y0) / (y1 - y0)) * (H - T - B);
    svg.appendChild(svgEl("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d0d7de" }));
    svg.appendChild(svgEl("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#d0d7de" }));
    for (let i = 0; i <= 4; i++) {
      const yv = y0 + ((y1 - y0) * i) / 4;
      const y = T + (1 - i / 4) * (H - T - B);
      const label = opts.log ? fmtBytes(Math.pow(10, yv)) : yv.toFixed(3);
      svg.appendChild(svgEl("text", { x: L - 4, y: y + 4, "text-anchor": "end" }, label));
    }
    svg.appendChild(svgEl("text", { x: L, y: H - 6 }, opts.xLabel + " " + x0));
    svg.appendChild(svgEl("text", { x: W - R, y: H - 6, "text-anchor": "end" }, String(x1)));
    for (const s of series) {
      const p = s.points.filter((q) => isFinite(q[1]) && (!opts.log || q[1] > 0));
      if (!p.length) continue;
      const d = p.map((q, i) => (i ? "L" : "M") + sx(q[0]).toFixed(1) + " " + sy(q[1]).toFixed(1)).join(" ");
      svg.appendChild(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": 2, "stroke-dasharray": s.dash ? "5 4" : "" }));
      if (p.length === 1) svg.appendChild(svgEl("circle", { cx: sx(p[0][0]), cy: sy(p[0][1]), r: 3, fill: s.color }));
    }
  }

  function render(s) {
    const p = s.progress, run = s.run, c = run.config;
    $("run-id").textContent = short(run.run_id);
    $("phase").textContent = run.phase;
    $("step").textContent = p.step;
    $("total").textContent = p.total_steps;
    $("loss").textContent = num(p.loss, 4);
    const wall = Math.max(0, (Date.now() - p.started_unix_ms) / 1000);
    const kv = [
      ["run id", run.run_id], ["trainer", short(run.trainer_id) + " @ " + run.trainer_addr],
      ["epoch", run.epoch], ["model", c.layers + " layers x " + c.hidden_size + ", vocab " + c.vocab_size],
      ["stages", c.stages + " (layers " + c.stage_bounds.join(", ") + ")"],
      ["batch", c.micro_batches + " micro-batches x " + c.micro_batch_size + " x " + c.seq_len + " tokens"],
      ["codecs", "act " + c.codec_activations + " / grad " + c.codec_gradients + " / sync " + c.codec_sync],
      ["step", p.step + " / " + p.total_steps], ["loss", num(p.loss, 4)],
      ["validation loss", p.val_loss === null ? "not evaluated yet (every eval_every steps)" : num(p.val_loss, 4)],
      ["learning rate", p.lr === null ? "-" : Number(p.lr).toExponential(3)],
      ["tokens/s", num(p.tokens_per_s, 0)], ["tokens", p.tokens],
      ["wall time", fmtS(wall)], ["training time", fmtS(p.train_s)], ["ETA", fmtS(p.eta_s)],
      ["retries", p.retries], ["peers lost / left", p.peers_lost + " / " + p.peers_left],
      ["restores", p.restores], ["audits (failed)", s.audits.audits + " (" + s.audits.failures + ")"],
    ];
    const dl = $("run-kv");
    dl.replaceChildren();
    for (const [k, v] of kv) { dl.appendChild(el("dt", k)); dl.appendChild(el("dd", v)); }

    plot($("loss-plot"), [
      { points: s.history.map((h) => [h.step + 1, h.loss]), color: "#0969da" },
      { points: (s.val_history || []).map((v) => [v.step, v.loss]), color: "#8250df" },
    ], { xLabel: "step" });

    // Coverage.
    const stages = $("stages");
    stages.replaceChildren();
    let broken = 0;
    for (const st of s.stages) {
      const d = el("div", null, "stage");
      d.dataset.stage = st.stage;
      d.dataset.health = st.health;
      if (st.health === "broken") broken++;
      d.appendChild(el("b", "stage " + st.stage));
      d.appendChild(el("span", " layers " + st.layers[0] + "-" + (st.layers[1] - 1) + " "));
      d.appendChild(el("span", st.health + " (" + st.serving + " serving)", "health-" + st.health));
      for (const r of st.replicas) {
        const line = el("div", null, "replica mono");
        line.dataset.peer = r.peer;
        line.appendChild(el("span", short(r.peer) + " "));
        line.appendChild(el("span", r.state, "state-" + r.state));
        line.appendChild(el("span", " load " + r.load));
        d.appendChild(line);
      }
      stages.appendChild(d);
    }
    $("coverage-summary").textContent = broken ? broken + " stage(s) broken" : "every stage covered";

    // Peers.
    fill($("peers").tBodies[0], s.peers.map((q) => {
      const tr = row([
        el("td", short(q.id), "mono"), el("td", q.addr, "mono"), q.stage === null ? "-" : q.stage,
        el("td", q.state, "state state-" + q.state), q.path, num(q.throughput_tokens_per_s, 0),
        q.load === null ? "-" : q.load, num(q.rtt_ms, 1), fmtBytes(q.tx_bytes), fmtBytes(q.rx_bytes),
        (q.channels || []).map((c) => c.channel.slice(0, 3) + " " + fmtBytes(c.wire_bytes)).join(", ") || "-",
        q.audits_passed + " / " + q.audits_failed, q.credited_micro_batches, q.pending_micro_batches,
        q.version === null ? "-" : q.version, q.last_seen_s === null ? "-" : num(q.last_seen_s, 1) + " s ago",
        q.ban_reason === null ? "" : "banned: " + q.ban_reason,
      ]);
      tr.className = "peer";
      tr.dataset.peer = q.id;
      tr.dataset.state = q.state;
      tr.dataset.path = q.path;
      return tr;
    }));

    // Bytes.
    const series = [], legend = $("bytes-legend");
    legend.replaceChildren();
    for (const ch of ["activations", "gradients", "sync"]) {
      const at = (h) => h.channels.find((x) => x.channel === ch) || { wire_bytes: 0, dense_bytes: 0 };
      series.push({ points: s.history.map((h) => [h.step + 1, at(h).wire_bytes]), color: COLORS[ch] });
      series.push({ points: s.history.map((h) => [h.step + 1, at(h).dense_bytes]), color: COLORS[ch], dash: true });
      const l = el("span", "\u25A0 " + ch);
      l.style.color = COLORS[ch];
      legend.appendChild(l);
    }
    legend.appendChild(el("span", "solid: wire, dashed: fp32 (cumulative, log scale)"));
    plot($("bytes-plot"), series, { xLabel: "step", log: true });
    fill($("channels").tBodies[0], s.channels.map((ch) => row([
      ch.channel, fmtBytes(ch.wire_bytes), fmtBytes(ch.dense_bytes),
      ch.wire_bytes ? (ch.dense_bytes / ch.wire_bytes).toFixed(1) + "x" : "-", ch.frames,
    ])));

    // Events, newest first.
    $("ledger-head").textContent = s.ledger.head || "(no ledger)";
    fill($("events").tBodies[0], s.events.slice().reverse().map((e) => {
      const tr = row([
        new Date(e.unix_ms).toLocaleTimeString(), e.step, el("td", e.kind, "ev-" + e.kind),
        el("td", short(e.peer), "mono"), e.stage === null ? "-" : e.stage, e.detail,
      ]);
      tr.className = "event ev-" + e.kind;
      return tr;
    }));
  }

  let lastOk = 0;
  async function poll() {
    try {
      const r = await fetch("api/v1/state", { cache: "no-store", headers: token ? { Authorization: "Bearer " + token } : {} });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const s = await r.json();
      render(s);
      lastOk = Date.now();
      $("status").textContent = "live, update " + s.seq + " at " + new Date(s.updated_unix_ms).toLocaleTimeString();
      $("status").className = "";
    } catch (e) {
      $("status").textContent = "no answer from the trainer (" + e.message + ")";
      $("status").className = "stale";
    }
    setTimeout(poll, POLL_MS);
  }
  poll();
})();
