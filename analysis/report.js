// usae analyze report: click a column header to sort (first click: descending), and an
// optional "hide dead concepts" switch, and a filter by the backbones a concept lives in. Vanilla JS, inlined: the report needs no network.
(function () {
  "use strict";
  function key(td) {
    var v = td.getAttribute("data-v");
    if (v === null) { v = td.textContent.trim(); }
    var x = parseFloat(v);
    return isNaN(x) ? null : x;
  }
  function sortBy(table, col, th) {
    var desc = th.getAttribute("aria-sort") !== "descending";
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", desc ? "descending" : "ascending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]);
      if (x === null && y === null) { return 0; }
      if (x === null) { return 1; }   // missing values last, whatever the direction
      if (y === null) { return -1; }
      return desc ? y - x : x - y;
    });
    var frag = document.createDocumentFragment();
    rows.forEach(function (r) { frag.appendChild(r); });
    body.appendChild(frag);
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    table.querySelectorAll("th").forEach(function (th, col) {
      th.addEventListener("click", function () { sortBy(table, col, th); });
    });
  });
  var filter = document.getElementById("member-filter");
  if (filter) {  // show only the concepts living in one member set
    filter.addEventListener("change", function () {
      document.querySelectorAll("#concepts tbody tr").forEach(function (r) {
        var want = filter.value;
        r.setAttribute("data-filtered", want && r.getAttribute("data-members") !== want ? "1" : "");
        r.style.display = r.getAttribute("data-filtered") || (hide && hide.checked && r.classList.contains("dead")) ? "none" : "";
      });
    });
  }
  var hide = document.getElementById("hide-dead");
  if (hide) {
    hide.addEventListener("change", function () {
      document.querySelectorAll("tr.dead").forEach(function (r) {
        r.style.display = hide.checked || r.getAttribute("data-filtered") ? "none" : "";
      });
    });
  }
})();
