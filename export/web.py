"""A static web page that runs the model in the visitor's browser: free to host, no server.

    python -m export web RUN_DIR --out my-page              # exports and verifies the model first
    python -m export web model.onnx --out my-page --examples 12
    python -m export serve my-page                          # http://127.0.0.1:8000

The folder holds index.html and plain JavaScript (no build step), onnxruntime-web
(WebAssembly), the model, example images only when asked for, and a README.md whose front
matter makes it a static Hugging Face Space, which any account may create for free. The page
reads labels, sizes, normalisation, temperature and thresholds from the ONNX file itself, and
preprocesses exactly as vit.runtime does (Pillow's resampling, ported pixel for pixel), so it
gives the same answers as Python. It makes no request outside its own folder.

onnxruntime-web comes from its npm package, pinned below and checked against the registry's
sha512 integrity. It is downloaded once (no Node needed) and cached; offline, pass the package
file with --runtime, or fetch it beforehand with `python -m export web-runtime`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import http.server
import json
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

from export.onnx_export import ExportError

ORT_WEB_VERSION = "1.30.0"
ORT_WEB_INTEGRITY = "sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ=="
ORT_WEB_URL = f"https://registry.npmjs.org/onnxruntime-web/-/onnxruntime-web-{ORT_WEB_VERSION}.tgz"
# The WebAssembly build only (14 MB): the WebGPU builds weigh 27-28 MB more, and a model this
# size gains nothing from a GPU that would pay for that download.
ORT_WEB_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PAGE = Path(__file__).with_name("webpage")
PAGE_FILES = ("index.html", "boot.js", "app.js", "vit.js", "style.css")
ORT_LICENSE = """MIT License

Copyright (c) Microsoft Corporation

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""
WEB_WHERE = (
    "It runs in the visitor's browser (onnxruntime-web, WebAssembly): images never leave their computer. "
    "Upload, drop, paste or photograph an image to see the top classes and an attention map of where the "
    "model looked."
)


# --------------------------------------------------------------------------------------
# onnxruntime-web: pinned, integrity-checked, downloaded once
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where downloaded set-up files are kept: $VIT_CACHE, else the platform's cache folder."""
    if os.environ.get("VIT_CACHE"):
        return Path(os.environ["VIT_CACHE"])
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "vit-app" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "vit-app"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vit-app"


def integrity_of(data: bytes) -> str:
    """npm's integrity string (Subresource Integrity, sha512) of a package file."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def runtime_package(given: Path | None = None, url: str = ORT_WEB_URL, log=print) -> Path:
    """The pinned onnxruntime-web package file, checked: ``given``, the cached copy, or downloaded
    once into the cache. Anything that does not match the pinned integrity is refused."""
    name = f"onnxruntime-web-{ORT_WEB_VERSION}.tgz"
    if given is not None:
        if not Path(given).is_file():
            raise ExportError(f"--runtime {given}: no such file")
        if integrity_of(Path(given).read_bytes()) != ORT_WEB_INTEGRITY:
            raise ExportError(f"{given} is not {name}: its sha512 differs from the pinned integrity")
        return Path(given)
    cached = cache_dir() / name
    if cached.is_file():
        if integrity_of(cached.read_bytes()) == ORT_WEB_INTEGRITY:
            return cached
        log(f"the cached {cached} does not match the pinned integrity: downloading it again")
        cached.unlink()
    log(f"downloading onnxruntime-web {ORT_WEB_VERSION} (33 MB, once) from {url}")
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            data = r.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ExportError(
            f"could not download onnxruntime-web {ORT_WEB_VERSION} from {url} ({reason}). The web page needs it "
            f"once; it is then kept in {cached.parent}. Connect and run again, or get the file on another machine "
            f"(npm pack onnxruntime-web@{ORT_WEB_VERSION}) and pass it with --runtime FILE."
        ) from None
    if integrity_of(data) != ORT_WEB_INTEGRITY:
        raise ExportError(f"the download from {url} does not match the pinned integrity: refused, nothing kept")
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial_file = cached.with_name(f"{name}.{os.getpid()}.partial")
    partial_file.write_bytes(data)
    partial_file.replace(cached)
    return cached


def runtime_files(package: Path) -> dict[str, bytes]:
    """The WebAssembly build's files, read from the package (nothing else is unpacked)."""
    with tarfile.open(package, "r:gz") as tar:
        return {name: tar.extractfile(f"package/dist/{name}").read() for name in ORT_WEB_FILES}


# --------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------


def readme(meta: dict, report: dict | None, title: str, labels: list[str]) -> str:
    from export.space import front_matter, model_card

    sdk = [
        "sdk: static",
        "app_file: index.html",
        "custom_headers:",  # cross-origin isolation: lets the runtime use several threads
        "  cross-origin-embedder-policy: require-corp",
        "  cross-origin-opener-policy: same-origin",
        "  cross-origin-resource-policy: cross-origin",
    ]
    serving = "\n".join(
        [
            "",
            "## Serving this folder",
            "",
            "It is a static site: any host that serves files will do (a static Hugging Face Space, free for "
            "every account; GitHub Pages, after deleting `.gitattributes`, since Pages serves Git LFS files as "
            "pointers; any web server). Locally, `python -m export serve .` in a checkout of "
            "the project, or `python -m http.server` here, then open http://127.0.0.1:8000. Opened as a file "
            "(file://) it cannot load: browsers refuse modules and WebAssembly from files.",
            "",
            "The runtime uses several threads only when the page is cross-origin isolated (the headers "
            "`Cross-Origin-Opener-Policy: same-origin` and `Cross-Origin-Embedder-Policy: require-corp`): the "
            "front matter above asks a Space for them and `python -m export serve` sends them; elsewhere it "
            "runs on one thread.",
            "",
            f"Runtime: onnxruntime-web {ORT_WEB_VERSION} (WebAssembly build), from its npm package, MIT licence "
            "(ort/LICENSE).",
            "",
        ]
    )
    return front_matter(title, labels, sdk) + model_card(meta, report, title, WEB_WHERE) + serving


def build_web(
    source: Path,
    out: Path,
    title: str | None = None,
    examples: int = 0,
    examples_from: Path | None = None,
    data: Path | None = None,
    int8: bool | None = None,
    canvas: bool = False,
    runtime: Path | None = None,
    log=print,
) -> Path:
    """Write the static page folder ``out`` from a run folder or an exported .onnx file."""
    from export.space import renamed_log, stage_examples, stage_model, staged, write_lfs_rules
    from vit.runtime import Classifier

    files = runtime_files(runtime_package(runtime, log=log))  # first: offline fails before any work
    with staged(out) as staging:
        log = renamed_log(staging, out, log)
        report = stage_model(source, staging / "model.onnx", data, int8, canvas, log)
        clf = Classifier(staging / "model.onnx", warmup=False)  # the file loads and has its metadata
        picked = stage_examples(source, staging / "examples", examples, examples_from, data, log)
        for name in PAGE_FILES:
            shutil.copy(PAGE / name, staging / name)
        (staging / "ort").mkdir()
        for name, blob in files.items():
            (staging / "ort" / name).write_bytes(blob)
        (staging / "ort" / "LICENSE").write_text(ORT_LICENSE, encoding="utf-8")
        title = title or "ViT image classifier"
        page = json.dumps({"title": title, "examples": picked}, indent=1, ensure_ascii=False) + "\n"
        (staging / "page.json").write_text(page, encoding="utf-8")
        (staging / "README.md").write_text(readme(clf.metadata, report, title, clf.labels), encoding="utf-8")
        write_lfs_rules(staging)
    return Path(out)


def page_weight(folder: Path) -> int:
    """Bytes a visitor downloads: everything but the README, LFS rules and examples not shown."""
    skip = {"README.md", ".gitattributes", "LICENSE"}
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.name not in skip)


# --------------------------------------------------------------------------------------
# Serving, for a look on this machine
# --------------------------------------------------------------------------------------


class PageHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with the types modules and WebAssembly need, cross-origin isolated."""

    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".mjs": "text/javascript",
        ".js": "text/javascript",
        ".wasm": "application/wasm",
        ".onnx": "application/octet-stream",
        ".json": "application/json",
    }
    isolated = True
    quiet = False

    def end_headers(self):
        if self.isolated:
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)


def page_server(folder: Path, host: str = "127.0.0.1", port: int = 8000, isolated: bool = True, quiet: bool = False):
    """A threading HTTP server for ``folder`` (not started). ``isolated``: send the
    cross-origin isolation headers that let the runtime use threads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} does not exist: build it with python -m export web SOURCE --out {folder}")
    if not (folder / "index.html").is_file():
        raise ExportError(f"{folder} has no index.html: build it with python -m export web SOURCE --out {folder}")
    handler = type("Handler", (PageHandler,), {"isolated": isolated, "quiet": quiet})
    return http.server.ThreadingHTTPServer((host, port), partial(handler, directory=str(folder)))


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from export.space import publish_args, quoted
    from vit.run import RunError
    from vit.runtime import ModelFileError

    runtime_help = f"the onnxruntime-web {ORT_WEB_VERSION} .tgz, if offline"
    a = publish_args(
        "python -m export web",
        __doc__,
        argv,
        lambda p: p.add_argument("--runtime", type=Path, default=None, help=runtime_help),
    )
    try:
        out = build_web(a.source, a.out, a.title, a.examples, a.examples_from, a.data, a.int8, a.canvas, a.runtime)
    except (ExportError, RunError, ModelFileError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    q = quoted(out)
    print(
        f"Web page ready: {out} ({page_weight(out) / 2**20:.1f} MiB for a visitor to load)\n"
        f"Look at it here: python -m export serve {q}   (then open http://127.0.0.1:8000)\n"
        "Publish it as a free static Hugging Face Space (huggingface_hub, installed with this project; "
        "`hf auth login` once first):\n"
        "  hf repos create USER/NAME --type space --sdk static\n"
        f"  hf upload USER/NAME {q} . --repo-type space\n"
        "or put the folder on any static host (for GitHub Pages, leave out its .gitattributes: Pages serves "
        "Git LFS files as pointers)."
    )
    return 0


def serve_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export serve", allow_abbrev=False, description="Serve a folder made by python -m export web."
    )
    p.add_argument("folder", type=Path, help="a folder made by python -m export web")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    a = p.parse_args(argv)
    try:
        server = page_server(a.folder, a.host, a.port)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot listen on {a.host}:{a.port} ({e.strerror or e}): choose another --port", file=sys.stderr)
        return 2
    print(f"Serving {a.folder} at http://{a.host}:{server.server_port} (Ctrl+C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def runtime_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m export web-runtime",
        allow_abbrev=False,
        description=f"Download onnxruntime-web {ORT_WEB_VERSION} once (integrity-checked) into the cache.",
    )
    p.parse_args(argv)
    try:
        path = runtime_package()
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"onnxruntime-web {ORT_WEB_VERSION}: {path} (integrity checked)")
    return 0
