"""The static web page (python -m export web) in headless Chromium against onnxruntime in Python.

    python benchmarks/web.py [--model assets/model.onnx] [--loads 5] [--reps 3]

Builds the page for the model (fp32) and for its int8 quantisation (export's own
quantize_int8; latency only), serves each on 127.0.0.1 with and without cross-origin
isolation (several WebAssembly threads, or one), and measures in Debian's Chromium:
- first answer: ms from navigation start until the first example's answer is shown, in a
  fresh browser context each load (nothing cached), median of --loads;
- per image: the model call (p50) and decode + preprocess + model (p50), over 50 shape images
  and the 12 examples, --reps times each; and the model call alone, back to back on one
  image (as Python's model call is timed);
- agreement with vit.runtime: top-1 and max |delta probability| on the same images;
- page weight: the folder's files (page_bytes) and what the browser received (bytes_loaded).
onnxruntime in Python is timed on the same images (the model call, and vit.runtime's whole
predict from the file: decode, preprocess, model, softmax), with 1 thread and with every
usable CPU. Writes benchmarks/web_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIMES = """async ([urls, reps]) => {
  await window.vitPage.ready;
  const model = [], total = [], answers = [];
  for (let k = 0; k < reps; k++) {
    for (const u of urls) {
      const blob = await (await fetch(u)).blob();
      const r = await window.vitPage.classifyBlob(blob, u);
      model.push(r.ms.model);
      total.push(r.ms.decode + r.ms.preprocess + r.ms.model);
      if (k === 0) answers.push({ label: r.label, probs: Array.from(r.probs) });
    }
  }
  const blob = await (await fetch(urls[0])).blob();
  const alone = await window.vitPage.timeModel(blob, 50 * reps);
  return { model, total, alone, answers, threads: window.vitPage.threads };
}"""


# Bytes the browser received for the page: the document and every file it fetched.
LOADED = """() => performance.getEntriesByType("navigation").concat(performance.getEntriesByType("resource"))
  .reduce((n, e) => n + e.encodedBodySize, 0)"""


def p50(xs: list[float]) -> float:
    return float(statistics.median(xs))


def python_times(model: Path, images: list[Path], reps: int) -> dict:
    from vit.cpus import usable_cpus
    from vit.runtime import Classifier

    out = {}
    for threads in sorted({1, usable_cpus()}):
        clf = Classifier(model, threads=threads)
        xs = [clf.preprocess(p)[None] for p in images]
        model_ms, whole_ms = [], []
        for _ in range(reps):
            for path, x in zip(images, xs):
                t0 = time.perf_counter()
                clf.run(x)
                t1 = time.perf_counter()
                clf.predict(path)  # decode, preprocess, model, softmax: the whole per-image path
                t2 = time.perf_counter()
                model_ms.append((t1 - t0) * 1000)
                whole_ms.append((t2 - t1) * 1000)
        out[f"threads_{threads}"] = dict(model_ms_p50=p50(model_ms), predict_ms_p50=p50(whole_ms))
    return out


def browser_times(site: Path, rels: list[str], loads: int, reps: int, isolated: bool) -> dict:
    from playwright.sync_api import sync_playwright

    from export.web import page_server

    server = page_server(site, port=0, isolated=isolated, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            first, loaded = [], []
            for _ in range(loads):
                context = browser.new_context()  # a fresh profile: nothing cached
                page = context.new_page()
                page.goto(url)
                page.evaluate("async () => { await window.vitPage.ready; }")
                first.append(page.evaluate("window.vitPage.firstAnswerMs"))
                loaded.append(page.evaluate(LOADED))
                context.close()
            page = browser.new_page()
            page.goto(url)
            got = page.evaluate(TIMES, [rels, reps])
            version = browser.version
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return dict(
        chromium=version,
        threads=got["threads"],
        first_answer_ms_median=p50(first),
        first_answer_ms=first,
        bytes_loaded=max(loaded),
        model_ms_p50=p50(got["model"]),
        model_alone_ms_p50=p50(got["alone"]),
        total_ms_p50=p50(got["total"]),
        answers=got["answers"],
    )


def agreement(model: Path, images: list[Path], answers: list[dict]) -> dict:
    from vit.runtime import Classifier

    clf = Classifier(model)
    same, worst = 0, 0.0
    for path, a in zip(images, answers):
        want = clf.predict(path)
        same += a["label"] == want.label
        worst = max(worst, float(np.abs(np.asarray(a["probs"]) - want.probs).max()))
    return dict(images=len(images), top1_identical=same, max_abs_prob_diff=worst)


def table(record: dict) -> str:
    """The README's table: per kind and threading, the browser against Python, and the ratios."""
    rows = [
        "| model | browser | first answer | model call, p50 (Python) | ratio | per image, p50 (Python) | ratio "
        "| top-1 same | max abs diff p | page |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, e in record["results"].items():
        for key, py_key in (("browser_isolated", None), ("browser_one_thread", "threads_1")):
            b = e[key]
            py = e["python"][py_key or max(e["python"], key=lambda k: int(k.split("_")[1]))]
            agree = b["agreement"]
            rows.append(
                f"| {kind} | {b['threads']} thread{'s' if b['threads'] > 1 else ''} "
                f"| {b['first_answer_ms_median'] / 1000:.2f} s "
                f"| {b['model_alone_ms_p50']:.2f} ms ({py['model_ms_p50']:.2f}) "
                f"| {b['model_alone_ms_p50'] / py['model_ms_p50']:.1f}x "
                f"| {b['total_ms_p50']:.2f} ms ({py['predict_ms_p50']:.2f}) "
                f"| {b['total_ms_p50'] / py['predict_ms_p50']:.1f}x "
                f"| {agree['top1_identical']}/{agree['images']} | {agree['max_abs_prob_diff']:.0e} "
                f"| {e['page_bytes'] / 2**20:.1f} MiB (model {e['model_bytes'] / 2**20:.1f}) |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from export.onnx_export import quantize_int8
    from export.web import ORT_WEB_VERSION, build_web, page_weight
    from vit.bench import command_line, machine
    from vit.datasets import make_shapes

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "assets" / "model.onnx")
    p.add_argument("--examples", type=Path, default=ROOT / "assets" / "examples")
    p.add_argument("--loads", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "web_cpu.json")
    a = p.parse_args(argv)
    import onnxruntime

    record = dict(
        command=command_line("python benchmarks/web.py", sys.argv[1:] if argv is None else argv),
        machine=machine(),
        onnxruntime_python=onnxruntime.__version__,
        onnxruntime_web=ORT_WEB_VERSION,
        results={},
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sites = {"fp32": build_web(a.model, tmp / "fp32", examples=12, examples_from=a.examples, log=lambda *_: None)}
        sites["int8"] = Path(shutil.copytree(sites["fp32"], tmp / "int8"))
        quantize_int8(a.model, sites["int8"] / "model.onnx")
        weight = {kind: page_weight(site) for kind, site in sites.items()}  # before the test images join
        make_shapes(tmp / "images", per_class=5, size=64, seed=7)
        images = sorted((sites["fp32"] / "examples").iterdir()) + sorted((tmp / "images").rglob("*.png"))
        for site in sites.values():
            shutil.copytree(tmp / "images", site / "images")
        rels = [f"examples/{p.name}" for p in images[:12]] + [p.relative_to(tmp).as_posix() for p in images[12:]]
        for kind, site in sites.items():
            model = site / "model.onnx"
            entry = dict(
                model_bytes=model.stat().st_size,
                page_bytes=weight[kind],
                python=python_times(model, images, a.reps),
            )
            for isolated in (True, False):
                got = browser_times(site, rels, a.loads, a.reps, isolated)
                got["agreement"] = agreement(model, images, got.pop("answers"))
                entry["browser_isolated" if isolated else "browser_one_thread"] = got
            record["results"][kind] = entry
            print(f"{kind}: {json.dumps(entry, indent=1)}", flush=True)
    a.out.write_text(json.dumps(record, indent=1) + "\n")
    print(table(record))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
