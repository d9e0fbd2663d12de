"""The app's serving cost against Gradio's own floor, measured in one run.

    python benchmarks/app_latency.py [--model assets/model.onnx]

Starts (1) a trivial Gradio app on the same Gradio version that returns a constant label
for any uploaded image, and (2) app.py on the model. For each: seconds from process start
to the page answering, sequential gradio_client calls (p50, p90), and 16 concurrent
clients x 10 requests (errors, requests/s). Also times the model alone in onnxruntime.
Writes benchmarks/app_latency_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRIVIAL = """
import sys
import gradio as gr

def predict(image):
    return {"constant": 1.0}

with gr.Blocks() as demo:
    image = gr.Image(type="filepath")
    label = gr.Label()
    gr.Button("go").click(predict, image, label, api_name="predict")
demo.queue()
demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]))
"""


def start(cmd: list[str], port: int, cwd: Path) -> tuple[subprocess.Popen, float]:
    import urllib.request

    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc, time.perf_counter() - t0
        except OSError:
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise SystemExit(f"server did not start: {cmd}") from None
            time.sleep(0.05)


def sequential(url: str, image: str, n: int) -> list[float]:
    from gradio_client import Client, handle_file

    c = Client(url, verbose=False)
    c.predict(handle_file(image), api_name="/predict")  # warm
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.predict(handle_file(image), api_name="/predict")
        out.append((time.perf_counter() - t0) * 1000)
    return out


def concurrent(url: str, image: str, clients: int, each: int) -> dict:
    from gradio_client import Client, handle_file

    cs = [Client(url, verbose=False) for _ in range(clients)]
    errors = 0

    def work(c):
        nonlocal errors
        for _ in range(each):
            try:
                c.predict(handle_file(image), api_name="/predict")
            except Exception:
                errors += 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(work, cs))
    dt = time.perf_counter() - t0
    return dict(
        requests=clients * each,
        errors=errors,
        seconds=round(dt, 2),
        requests_per_s=round((clients * each - errors) / dt, 2),
    )


# The benchmark's protocol in one place (both apps' start, single calls, the concurrent
# load, the record), so what was measured can be read without jumping between helpers.
def main() -> None:
    import socket

    from vit.bench import machine
    from vit.runtime import Classifier

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "assets" / "model.onnx")
    p.add_argument("--image", type=Path, default=None)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "app_latency_cpu.json")
    a = p.parse_args()
    image = str(a.image or sorted((ROOT / "assets" / "examples").glob("*.png"))[0])

    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    clf = Classifier(a.model)
    from PIL import Image

    img = Image.open(image)
    model_ms = []
    for _ in range(a.n):
        t0 = time.perf_counter()
        clf.predict(img)
        model_ms.append((time.perf_counter() - t0) * 1000)
    del clf

    import gradio

    res = dict(
        machine=machine(),
        gradio=gradio.__version__,
        model=str(a.model.name),
        command="python benchmarks/app_latency.py",
        model_alone_ms_p50=round(statistics.median(model_ms), 2),
    )
    with tempfile.TemporaryDirectory() as tmp:
        trivial_py = Path(tmp) / "trivial.py"
        trivial_py.write_text(TRIVIAL)
        commands = {
            "trivial": lambda pt: [sys.executable, str(trivial_py), str(pt)],
            "app": lambda pt: [sys.executable, "app.py", "--model", str(a.model), "--port", str(pt)],
        }
        for name, cmd_of in commands.items():
            pt = port()
            proc, ready = start(cmd_of(pt), pt, ROOT)
            try:
                url = f"http://127.0.0.1:{pt}/"
                seq = sequential(url, image, a.n)
                conc = concurrent(url, image, 16, 10)
            finally:
                proc.terminate()
                proc.wait(10)
            res[name] = dict(
                start_to_ready_s=round(ready, 2),
                p50_ms=round(statistics.median(seq), 1),
                p90_ms=round(sorted(seq)[int(0.9 * len(seq)) - 1], 1),
                concurrent_16x10=conc,
            )
            print(name, json.dumps(res[name]), flush=True)
    floor = res["trivial"]["p50_ms"]
    res["targets"] = dict(
        start_to_ready_s=dict(value=res["app"]["start_to_ready_s"], goal="<= 10"),
        p50_vs_floor_plus_model=dict(
            value=round(res["app"]["p50_ms"] / (floor + res["model_alone_ms_p50"]), 3), goal="<= 1.2"
        ),
        throughput_vs_trivial=dict(
            value=round(
                res["app"]["concurrent_16x10"]["requests_per_s"] / res["trivial"]["concurrent_16x10"]["requests_per_s"],
                3,
            ),
            goal=">= 0.8",
        ),
        errors=dict(value=res["app"]["concurrent_16x10"]["errors"], goal="0"),
    )
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["targets"], indent=2))


if __name__ == "__main__":
    main()
