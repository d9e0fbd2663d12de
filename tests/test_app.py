"""app.py with real clients: gradio_client over HTTP, and headless Chromium."""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from tests.conftest import ROOT

ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 90):
    """Start an app process and wait until its page answers; returns (process, url, seconds to ready)."""
    port = free_port()
    env = {**os.environ, **(env or {}), "PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("GRADIO_SERVER_NAME", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "app.py", *args, "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"app exited early:\n{proc.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url, time.perf_counter() - t0
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"app not ready after {timeout}s")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    proc, url, _ = launch(["--model", str(exported[0]), "--max-upload-mb", "1"], cwd=ROOT)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shapes_dir):
    """Every kind of upload, good and bad."""
    d = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(0)
    src = Image.open(next((shapes_dir / "square").iterdir())).convert("RGB").resize((48, 40))
    good = {"plain.png": src}
    good["rgba.png"] = src.convert("RGBA")
    good["palette.png"] = src.convert("P")
    good["gray.png"] = src.convert("L")
    good["cmyk.jpg"] = src.convert("CMYK")
    good["16bit.png"] = Image.fromarray(rng.integers(0, 65535, (40, 48), dtype=np.uint16))
    for name, img in good.items():
        img.save(d / name)
    exif = Image.Exif()
    exif[0x0112] = 6
    src.save(d / "rotated.jpg", exif=exif)
    src.save(d / "anim.gif", save_all=True, append_images=[src.rotate(90)])
    bad = {}
    (d / "notes.png").write_text("this is text, not a picture")
    bad["notes.png"] = "not an image"
    (d / "empty.png").write_bytes(b"")
    bad["empty.png"] = "empty file"
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[:400])
    bad["truncated.png"] = "corrupt or truncated"
    Image.new("L", (7000, 7000)).save(d / "bomb.png")  # 49M pixels, a few KB on disk
    bad["bomb.png"] = "over the limit"
    Image.fromarray(rng.integers(0, 255, (800, 700, 3), dtype=np.uint8)).save(d / "big.png")  # ~1.7 MB > 1 MB
    return d, sorted(good) + ["rotated.jpg", "anim.gif"], bad


def test_example_image_gets_the_right_label(client, exported, run_dir, shapes_dir):
    from vit.runtime import Classifier

    clf = Classifier(exported[0])
    path = next((shapes_dir / "cross").iterdir())
    label, overlay, note = client.predict(handle_file(str(path)), api_name="/predict")
    assert label["label"] == clf.predict(Image.open(path)).label  # what the model itself says
    assert {c["label"] for c in label["confidences"]} <= set(clf.labels)
    assert overlay.startswith('<img src="data:image/jpeg;base64,') and "ms" in note


def test_every_good_kind_of_image_is_classified(client, inputs):
    d, good, _ = inputs
    for name in good:
        label, _, _ = client.predict(handle_file(str(d / name)), api_name="/predict")
        assert label["label"] in ("circle", "cross", "square", "triangle"), name


def test_bad_inputs_get_a_message_and_the_server_keeps_serving(client, inputs):
    d, good, bad = inputs
    for name, fragment in bad.items():
        with pytest.raises(Exception) as err:
            client.predict(handle_file(str(d / name)), api_name="/predict")
        assert fragment in str(err.value), (name, str(err.value))
    with pytest.raises(ValueError, match="exceeds the maximum file size of 1048576 bytes"):  # the 1 MB limit
        client.predict(handle_file(str(d / "big.png")), api_name="/predict")
    label, _, _ = client.predict(handle_file(str(d / good[0])), api_name="/predict")
    assert label["label"]


def test_batch_endpoint_gives_a_table_and_csv(client, inputs):
    d, good, bad = inputs
    table, csv_path = client.predict(
        [handle_file(str(d / n)) for n in (good[0], "notes.png", good[1])], api_name="/predict_batch"
    )
    rows = table["data"]
    assert [r[0] for r in rows] == [good[0], "notes.png", good[1]]
    assert rows[1][5].startswith("error:") and rows[0][1] in ("circle", "cross", "square", "triangle")
    assert rows[0][4] in ("yes", "no")  # the out-of-distribution answer has its column
    text = Path(csv_path).read_text()
    assert text.splitlines()[0] == "file,label,probability,runner-up,known,note" and len(text.splitlines()) == 4


def test_unlike_anything_known_is_said_in_words_with_the_closest_class(client, tmp_path):
    """Noise is not a shape: the app (and its API) says so, and still names the closest class."""
    rng = np.random.default_rng(1)
    path = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    label, _, note = client.predict(handle_file(str(path)), api_name="/predict")
    assert "does not look like any of the 4 things this model knows" in note
    assert f"The closest is {label['label']}" in note and label["confidences"]


def test_concurrent_clients_all_succeed(server, inputs):
    from concurrent.futures import ThreadPoolExecutor

    d, good, _ = inputs

    def one(i):
        return Client(server, verbose=False).predict(handle_file(str(d / good[i % len(good)])), api_name="/predict")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    assert all(r[0]["label"] for r in results)


def test_app_serves_no_files_beyond_its_assets(server):
    for target in (ROOT / "app.py", ROOT / "pyproject.toml"):
        for prefix in ("gradio_api/file=", "file="):
            try:
                with urllib.request.urlopen(f"{server}{prefix}{target}", timeout=5) as r:
                    assert target.read_bytes() not in r.read()
            except urllib.error.HTTPError as e:
                assert e.code in (403, 404)


def test_missing_or_invalid_model_exits_with_a_message(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"nope")
    for model, message in (
        (tmp_path / "missing.onnx", "model file not found"),
        (tmp_path / "bad.onnx", "not a valid ONNX model"),
    ):
        res = subprocess.run(
            [sys.executable, "app.py", "--model", str(model)], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_importing_the_app_does_not_import_torch():
    code = "import sys, app; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_space_folder_runs_from_its_own_directory(run_dir, tmp_path):
    from export.space import build_space

    space = build_space(run_dir, tmp_path / "space", examples=4)
    readme = (space / "README.md").read_text()
    req = (space / "requirements.txt").read_text()
    import gradio

    assert f"sdk_version: {gradio.__version__}" in readme and "sdk: gradio" in readme and "app_file: app.py" in readme
    assert f"gradio=={gradio.__version__}" in req and "torch" not in req
    assert "Validation accuracy" in readme and (space / "assets" / "model.onnx").is_file()
    # Item 21: say only what is known and measured.
    assert "Weights: trained from scratch on" in readme and "Weights: none" not in readme
    assert "confident answers less often" not in readme
    assert "Share of images answered as known, measured at export: validation" in readme  # measured rates
    assert len(list((space / "assets" / "examples").iterdir())) == 4
    env = {"PYTHONPATH": "", "PYTHONNOUSERSITE": "1"}
    proc, url, _ = launch([], cwd=space, env=env)
    try:
        example = sorted((space / "assets" / "examples").iterdir())[0]
        label, _, _ = Client(url, verbose=False).predict(handle_file(str(example)), api_name="/predict")
        assert label["label"] in ("circle", "cross", "square", "triangle")
    finally:
        stop(proc)


def browser(p, extra_args: tuple[str, ...] = ()):
    return p.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
        + list(extra_args),
    )


def upload_and_read_label(url: str, image: Path, screenshot: Path) -> str:
    """Open the app, upload ``image``, click Classify, return the shown label; save a screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = browser(p)
        page = b.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.locator("input[type=file]").first.set_input_files(str(image))
        page.get_by_role("button", name="Classify", exact=True).click()
        label = page.locator("[data-testid=label-output-value]").first
        label.wait_for(timeout=60_000)
        page.wait_for_timeout(800)  # let the attention overlay arrive
        text = label.inner_text().strip()
        page.screenshot(path=str(screenshot), full_page=True)
        b.close()
    return text


def screenshot_report(run_dir: Path, screenshot: Path) -> str:
    """Render the run's report.md as a page in Chromium; return the page text."""
    from markdown_it import MarkdownIt  # ships with gradio
    from playwright.sync_api import sync_playwright

    body = MarkdownIt("commonmark").enable("table").render((run_dir / "report.md").read_text())
    page_file = run_dir / "report.html"
    page_file.write_text(
        "<html><body style='font-family:sans-serif;max-width:1000px;margin:24px'>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        f"img{{max-width:100%}}</style>{body}</body></html>"
    )
    with sync_playwright() as p:
        b = browser(p)
        page = b.new_page(viewport={"width": 1100, "height": 900})
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        text = page.inner_text("body")
        page.screenshot(path=str(screenshot), full_page=True)
        b.close()
    return text


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"
)


@needs_chromium
def test_browser_upload_shows_the_label(server, shapes_dir):
    ARTIFACTS.mkdir(exist_ok=True)
    text = upload_and_read_label(server, next((shapes_dir / "circle").iterdir()), ARTIFACTS / "app.png")
    assert text in ("circle", "cross", "square", "triangle")
    assert (ARTIFACTS / "app.png").stat().st_size > 10_000


@needs_chromium
def test_browser_renders_the_training_report(run_dir):
    ARTIFACTS.mkdir(exist_ok=True)
    text = screenshot_report(run_dir, ARTIFACTS / "report.png")
    assert "Validation report" in text and "macro average" in text
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_canvas_input_is_bounded_like_uploads(exported, tmp_path):
    """Item 11: the drawing canvas hands the app its raw picture (Gradio decodes nothing), and
    the app's byte and pixel limits apply to it as to uploads."""
    import gradio as gr
    from gradio.components.image_editor import EditorData
    from gradio.data_classes import FileData

    import app
    from vit.runtime import Classifier

    huge = tmp_path / "huge.png"
    Image.new("1", (10_000, 10_000)).save(huge)  # 100 MP in a few kB
    with gr.Blocks():
        pad = app.raw_canvas(canvas_size=(64, 64))
    raw = pad.preprocess(EditorData(composite=FileData(path=str(huge)), layers=[]))
    assert raw == str(huge)
    predictor = app.Predictor(Classifier(exported[0]), max_bytes=2**20)
    for value in (raw, huge.read_bytes()):
        with pytest.raises(gr.Error, match="over the limit"):
            predictor.predict(value)
    with pytest.raises(gr.Error, match="the limit is 1 MB"):
        predictor.predict(b"\0" * (2**20 + 1))
    small = tmp_path / "drawing.png"
    Image.new("RGB", (64, 64), "white").save(small)
    label, _, note = predictor.predict(pad.preprocess(EditorData(composite=FileData(path=str(small)), layers=[])))
    assert set(label) <= {"circle", "cross", "square", "triangle"} and "ms" in note


def test_analytics_off_and_files_cleaned_up(exported):
    """Item 20: no usage analytics unless the user turns them on; CSVs and Gradio's cache expire."""
    code = "import app, gradio.analytics as a; print(a.analytics_enabled())"
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert res.stdout.strip() == "False", res.stderr
    import app
    from vit.runtime import Classifier

    clf = Classifier(exported[0])
    demo = app.build_ui(clf, examples_dir=None)
    assert demo.delete_cache == (app.CACHE_HOURS * 3600, app.CACHE_HOURS * 3600)
    predictor = app.Predictor(clf)
    old = predictor.csv_dir / "predictions-old.csv"
    old.write_text("file\n")
    os.utime(old, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    _, csv_path = predictor.predict_batch([str(p) for p in sorted(app.EXAMPLES.glob("*.png"))[:2]])
    assert Path(csv_path).parent == predictor.csv_dir and Path(csv_path).is_file() and not old.exists()
