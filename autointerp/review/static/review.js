// The review page's keys. Plain forms do the work; this only presses their buttons and follows links.
(function () {
  "use strict";
  function submit(id) {
    var form = document.getElementById(id);
    if (form) { form.requestSubmit ? form.requestSubmit() : form.submit(); }
  }
  function follow(rel) {
    var link = document.querySelector('a[rel="' + rel + '"]');
    if (link) { window.location.href = link.href; }
  }
  function toggleHelp(show) {
    var help = document.getElementById("help");
    if (help) { help.hidden = show === undefined ? !help.hidden : !show; }
  }
  function openEdit() {
    var form = document.getElementById("edit-form");
    if (!form) { return; }
    form.hidden = false;
    var text = document.getElementById("edit-text");
    text.focus();
    text.select();
  }
  document.addEventListener("DOMContentLoaded", function () {
    var open = document.getElementById("edit-open");
    if (open) { open.addEventListener("click", openEdit); }
    var sim = document.getElementById("toggle-sim");
    if (sim) {
      if (!document.querySelector(".rec.has-sim")) { sim.disabled = true; sim.title = "no test record has simulated activations"; }
      sim.addEventListener("click", function () {
        var on = document.body.classList.toggle("show-sim");
        sim.textContent = on ? "show real" : "show simulated";
      });
    }
    var text = document.getElementById("edit-text");
    if (text) {
      text.addEventListener("keydown", function (ev) {
        if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); submit("edit-form"); }
        if (ev.key === "Escape") { document.getElementById("edit-form").hidden = true; text.blur(); }
      });
    }
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    var t = ev.target;
    if (t && t.closest && t.closest("input, textarea, select")) { return; }
    var actions = {
      a: function () { submit("decide-accept"); },
      r: function () { submit("decide-reject"); },
      f: function () { submit("decide-flag"); },
      e: openEdit,
      u: function () { submit("undo"); },
      j: function () { follow("next"); },
      k: function () { follow("prev"); },
      "?": function () { toggleHelp(); },
      Escape: function () { toggleHelp(false); }
    };
    var act = actions[ev.key];
    if (act) { ev.preventDefault(); act(); }
  });
})();
