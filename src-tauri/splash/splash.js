// The desktop shell shows this page only while starting or when the server could not start; in
// the latter case it sets window.__LD_STARTUP_ERROR__ (a plain string) before the page loads.
"use strict";
(function () {
  var message = window.__LD_STARTUP_ERROR__;
  if (typeof message !== "string") return;
  document.getElementById("status").hidden = true;
  document.getElementById("error-message").textContent = message;
  document.getElementById("error").hidden = false;
})();
