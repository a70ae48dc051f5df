// Draws every chart of the page: each <div data-figure="ID"> takes its Plotly figure from the JSON in the
// <script type="application/json" id="ID"> beside it (no inline script, so the page's CSP can forbid them).
(function () {
  function draw(root) {
    root.querySelectorAll("[data-figure]").forEach(function (div) {
      var source = document.getElementById(div.getAttribute("data-figure"));
      if (!source || div.getAttribute("data-drawn")) { return; }
      var figure = JSON.parse(source.textContent);
      div.setAttribute("data-drawn", "1");
      Plotly.newPlot(div, figure.data, figure.layout, {displaylogo: false, responsive: true});
    });
  }
  document.addEventListener("DOMContentLoaded", function () { draw(document); });
  document.addEventListener("htmx:afterSwap", function (event) { draw(event.target); });
})();
