// A classic script, so it runs where the page's modules cannot: opened as a file (file://),
// browsers refuse to load modules and WebAssembly, and the page would wait forever.
if (location.protocol === "file:") {
  const status = document.getElementById("status");
  status.textContent =
    "This page must be served, not opened as a file: run `python -m http.server` in its folder " +
    "(or `python -m export serve FOLDER`) and open http://127.0.0.1:8000.";
  status.classList.add("error");
}
