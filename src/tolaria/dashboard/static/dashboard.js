// The dashboard's page script: draw a run's curves (plotly.js, served by the dashboard from
// the installed plotly package) and keep a live page current without a reload.  The server
// renders every section; this script only swaps them in and redraws the charts.
(function () {
  "use strict";
  const POLL_MS = 1500;
  const main = document.querySelector("main");
  const dataTag = document.getElementById("page-data");

  function markers(charts) {
    const lines = [];
    // Incidents first: a rollback at the same epoch is drawn over its incident.
    for (const [list, colour] of [[charts.incidents, "#e67e22"], [charts.rollbacks, "#c0392b"]]) {
      for (const mark of list) {
        lines.push({type: "line", xref: "x", yref: "paper", x0: mark.epoch, x1: mark.epoch,
                    y0: 0, y1: 1, line: {color: colour, width: 2, dash: "dot"}});
      }
    }
    return lines;
  }

  function draw(charts) {
    if (typeof Plotly === "undefined") return;
    const c = charts.curves;
    const shapes = markers(charts);
    const hover = [...charts.incidents, ...charts.rollbacks];
    const notes = {x: hover.map((m) => m.epoch), y: hover.map(() => 1), yaxis: "y2",
                   mode: "markers", marker: {symbol: "triangle-down", size: 9,
                   color: hover.map((m, i) => i < charts.incidents.length ? "#e67e22" : "#c0392b")},
                   text: hover.map((m) => m.text), hoverinfo: "text", name: "events",
                   showlegend: false};
    const plots = [
      ["chart-score", `validation ${charts.monitor}`,
       [{x: c.epoch, y: c.val_accuracy, name: `val ${charts.monitor}`, mode: "lines+markers"}]],
      ["chart-loss", "loss",
       [{x: c.epoch, y: c.train_loss, name: "train loss", mode: "lines+markers"},
        {x: c.epoch, y: c.val_loss, name: "val loss", mode: "lines+markers"}]],
      ["chart-lr", "learning rate",
       [{x: c.epoch, y: c.lr, name: "lr", mode: "lines+markers", line: {shape: "hv"}}],
       {rangemode: "tozero", exponentformat: "e"}],
      ["chart-params", "trainable parameters",
       [{x: c.epoch, y: c.params, name: "parameters", mode: "lines+markers",
         line: {shape: "hv"}}]],
    ];
    for (const [id, title, traces, yaxis] of plots) {
      const el = document.getElementById(id);
      if (!el) continue;
      Plotly.react(el, [...traces, notes], {
        title: {text: title, font: {size: 14}}, shapes: shapes,
        margin: {l: 55, r: 15, t: 35, b: 35}, height: 240,
        xaxis: {title: {text: "epoch"}, dtick: c.epoch.length > 20 ? undefined : 1},
        yaxis: yaxis || {},
        yaxis2: {overlaying: "y", range: [0, 1.05], visible: false, fixedrange: true},
        legend: {x: 1, xanchor: "right", y: 1, bgcolor: "rgba(255,255,255,0.7)"},
        showlegend: traces.length > 1,
      }, {displayModeBar: false, responsive: true, staticPlot: false});
    }
  }

  if (dataTag) draw(JSON.parse(dataTag.textContent));

  const live = main && main.dataset.live;
  if (!live) return;
  let cursor = main.dataset.cursor;
  let updates = 0;
  async function poll() {
    try {
      const answer = await fetch(`${live}?since=${encodeURIComponent(cursor)}`,
                                 {credentials: "same-origin", cache: "no-store"});
      if (answer.ok) {
        const update = await answer.json();
        if (update.changed) {
          for (const [name, html] of Object.entries(update.sections)) {
            const section = document.querySelector(`[data-section="${name}"]`);
            if (section) section.innerHTML = html;
          }
          if (update.charts) draw(update.charts);
          cursor = update.cursor;
          main.dataset.cursor = cursor;
          main.dataset.updates = String(++updates);
        }
        main.dataset.polled = String(Date.now());
      }
    } catch (err) {
      // The server went away (stopped, restarted): keep trying; the page stays as it was.
    }
    setTimeout(poll, POLL_MS);
  }
  setTimeout(poll, POLL_MS);
})();
