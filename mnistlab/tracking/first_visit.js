/* mnistlab's defaults for what a browser has not chosen in MLflow's UI (see ui_plugin.py). Run before
 * MLflow's own script, called with ``d``: {workflow: [key, value], assistant: key, states: [[key, value]],
 * experiments: [id]} (the model-training experiments). What the browser already holds is never replaced. */
(function (d) {
  var store;
  try {
    store = window.localStorage;
    if (store.getItem(d.workflow[0]) === null) store.setItem(d.workflow[0], d.workflow[1]);
    if (store.getItem(d.assistant) === null) store.setItem(d.assistant, "true");
    d.states.forEach(function (k) { if (store.getItem(k[0]) === null) store.setItem(k[0], k[1]); });
  } catch (e) {
    return; // no localStorage (blocked by the browser): MLflow's own defaults
  }

  // A run's "Model metrics" tab: MLflow keeps its charts under this key once it has drawn them, and
  // before that sorts them by name (val_acc among the last). For a run of a model-training experiment
  // that was never opened here, the charts start with the score and the losses (accuracy, its loss,
  // train_loss, train_acc), then the rest by name, as MLflow's own cards of the run's latest metrics.
  var CHART_KEY = /^MLflowLocalStorage-1\.1-RunPage-([0-9a-f]{32})-model-chartUIState$/;
  var SECTION = "Model metrics"; // MLflow's section of the metrics not under "system/"
  var known = {};
  d.experiments.forEach(function (id) { known[id] = true; });

  function run(id) { // MLflow's own API, asked as the page asks it (its login and permissions apply)
    var xhr = new XMLHttpRequest();
    xhr.open("GET", "ajax-api/2.0/mlflow/runs/get?run_id=" + id, false);
    xhr.send();
    return xhr.status === 200 ? JSON.parse(xhr.responseText).run : null;
  }

  function card(key, i, line) { // the fields of MLflow 3.17's generated LINE and BAR cards
    var c = {uuid: "mnistlab-" + i, type: line ? "LINE" : "BAR", runsCountToCompare: 10, metricSectionId: "mnistlab",
             deleted: false, isGenerated: true, displayName: key, metricKey: key};
    if (!line) return c;
    c.lineSmoothness = 0; c.xAxisScaleType = "linear"; c.scaleType = "linear"; c.range = {};
    c.xAxisKey = "step"; c.selectedXAxisMetricKey = ""; c.yAxisKey = "metric"; c.yAxisExpressions = [];
    c.ignoreOutliers = false; c.useGlobalXaxisKey = true; c.useGlobalLineSmoothing = true;
    return c;
  }

  function charts(r) {
    if (!r || !r.info || !known[r.info.experiment_id]) return null;
    var step = {};
    ((r.data && r.data.metrics) || []).forEach(function (m) {
      if (m.key.indexOf("system/") !== 0) step[m.key] = m.step || 0;
    });
    var acc = "val_acc" in step ? "val_acc" : "test_acc" in step ? "test_acc" : null;
    if (acc === null) return null; // no score (a study's parent run): MLflow's order
    var first = [acc, acc.replace("acc", "loss"), "train_loss", "train_acc"].filter(function (k) { return k in step; });
    var keys = first.concat(Object.keys(step).filter(function (k) { return first.indexOf(k) < 0; }).sort());
    return {
      isAccordionReordered: false, autoRefreshEnabled: true,
      globalLineChartConfig: {xAxisKey: "step", lineSmoothness: 0, selectedXAxisMetricKey: ""},
      // isReordered: metrics that arrive later are added after these, not sorted in among them
      compareRunSections: [{uuid: "mnistlab", name: SECTION, display: true, isReordered: true, deleted: false,
                            isGenerated: true}],
      compareRunCharts: keys.map(function (k, i) { return card(k, i, step[k] >= 1); })
    };
  }

  var getItem = Storage.prototype.getItem;
  Storage.prototype.getItem = function (key) {
    var value = getItem.call(this, key);
    var m = value === null && this === store && CHART_KEY.exec(key);
    if (!m) return value;
    try {
      var where = /#\/experiments\/([^/?#]+)\//.exec(window.location.hash);
      if (where && !known[decodeURIComponent(where[1])]) return value;
      var state = charts(run(m[1]));
      return state ? JSON.stringify(state) : value;
    } catch (e) {
      return value; // the run could not be read: MLflow's order
    }
  };
})
