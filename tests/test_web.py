"""The static web page (python -m export web) in a real headless Chromium, against vit.runtime."""

import io
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.onnx_export import ExportError
from export.web import ORT_WEB_VERSION, build_web, cache_dir, integrity_of, page_server, page_weight, runtime_package
from tests.conftest import ROOT
from tests.test_app import CHROMIUM, browser
from vit.datasets import make_shapes
from vit.runtime import Classifier

BUNDLED = ROOT / "assets" / "model.onnx"


def cached_runtime() -> Path | None:
    """The set-up's copy of onnxruntime-web (make test fetches it); tests never download."""
    path = cache_dir() / f"onnxruntime-web-{ORT_WEB_VERSION}.tgz"
    return path if path.is_file() else None


needs_page = pytest.mark.skipif(
    CHROMIUM is None or cached_runtime() is None,
    reason="needs Debian's chromium and the cached onnxruntime-web (make test sets up both)",
)


def launch_browser(p, camera: bool = False):
    """Debian's chromium as the app's tests drive it; ``camera``: with a synthetic webcam that
    needs no permission prompt."""
    fake = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")
    return browser(p, fake if camera else ())


@pytest.fixture(scope="module")
def page_site(tmp_path_factory):
    """The bundled model's page with its examples, plus test images, served on 127.0.0.1."""
    root = tmp_path_factory.mktemp("web")
    examples = ROOT / "assets" / "examples"
    site = build_web(BUNDLED, root / "page", examples=12, examples_from=examples, log=lambda *_: None)
    extra = site / "test-images"
    make_shapes(extra, per_class=5, size=64, seed=7)  # 50 images of the model's own classes
    rng = np.random.default_rng(0)
    for i, p in enumerate(sorted(extra.rglob("*.png"))[:12]):  # odd sizes, JPEG, EXIF, transparency
        img = Image.open(p).convert("RGB")
        w, h = [(97, 61), (300, 200), (33, 140), (640, 480)][i % 4]
        img = img.resize((w, h), Image.Resampling.BILINEAR)
        if i % 3 == 0:
            exif = Image.Exif()
            exif[0x0112] = 6  # rotated 90°: both sides must turn it upright
            img.save(p.with_name(f"odd{i}.jpg"), quality=90, exif=exif)
        elif i % 3 == 1:
            img.save(p.with_name(f"odd{i}.jpg"), quality=85)
        else:
            a = np.asarray(img.convert("RGBA")).copy()
            a[..., 3] = rng.integers(128, 256, a.shape[:2])
            Image.fromarray(a).save(p.with_name(f"odd{i}.png"))
    png = sorted(extra.rglob("*.png"))[-1]
    png.rename(png.with_name("really_a_png.jpg"))  # the content decides, not the name
    server = page_server(site, port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield site, f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


CLASSIFY = """async (urls) => {
  await window.vitPage.ready;
  const out = [];
  for (const u of urls) {
    const blob = await (await fetch(u)).blob();
    const r = await window.vitPage.classifyBlob(blob, u);
    out.push({ label: r.label, probs: Array.from(r.probs), status: r.status, ood: r.oodScore, ms: r.ms });
  }
  return out;
}"""


PIXELS = """async (urls) => Promise.all(
  urls.map(async (u) => window.vitPage.preprocessBlob(await (await fetch(u)).blob())))"""


@needs_page
def test_page_answers_as_vit_runtime_without_leaving_127_0_0_1(page_site):
    from playwright.sync_api import sync_playwright

    site, url = page_site
    clf = Classifier(site / "model.onnx")
    files = sorted((site / "examples").iterdir()) + sorted((site / "test-images").rglob("*.*"))
    assert len(files) >= 62
    rels = [f.relative_to(site).as_posix() for f in files]
    with sync_playwright() as p:
        b = launch_browser(p)
        page = b.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(url)
        got = page.evaluate(CLASSIFY, rels)
        pixels = page.evaluate(PIXELS, rels)
        b.close()
    worst = 0.0
    for f, r in zip(files, got):
        want = clf.predict(f)
        assert r["label"] == want.label, f.name
        assert r["status"] == want.status, f.name
        worst = max(worst, float(np.abs(np.asarray(r["probs"]) - want.probs).max()))
        if want.ood_score is not None:
            assert r["ood"] == pytest.approx(want.ood_score, rel=1e-3, abs=1e-3)
    assert worst <= 1e-3
    # The page's input tensors are vit.runtime's, value for value: decoding (PNG, JPEG, EXIF
    # rotation, transparency, a PNG named .jpg) and Pillow's resampling, ported.
    for f, px in zip(files, pixels):
        x = clf.preprocess(f)
        assert np.abs(np.asarray(px, np.float32).reshape(x.shape) - x).max() < 1e-5, f.name
    assert requests and all(u.startswith(url) for u in requests), [u for u in requests if not u.startswith(url)]


def bad_files(tmp: Path) -> dict[str, bytes]:
    """Inputs that are not a usable image, each with the words its message must contain."""
    png = io.BytesIO()
    Image.new("RGB", (40, 40), "white").save(png, format="PNG")
    huge = bytearray(png.getvalue())
    huge[16:24] = (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big")  # header claims 3.6 G pixels
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    return {
        "notes.txt": (b"just some text, not an image\n" * 3, "not an image"),
        "empty.png": (b"", "empty"),
        "cut.png": (png.getvalue()[:60], "corrupt or truncated"),
        "huge.png": (bytes(huge), "over the limit"),
        "scan.tif": (tiff.getvalue(), "TIFF"),
        "big.jpg": (b"\xff\xd8\xff" + bytes(11 * 2**20), "the limit is 10 MB"),
    }


@needs_page
def test_every_input_route_and_bad_files_get_a_sentence(page_site, tmp_path):
    from playwright.sync_api import sync_playwright

    site, url = page_site
    labels = Classifier(site / "model.onnx", warmup=False).labels
    good = next((site / "test-images" / "circle").iterdir())
    frames = [Image.new("RGB", (32, 32), c) for c in ("white", "black", "red")]
    anim = tmp_path / "moving.gif"
    frames[0].save(anim, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with sync_playwright() as p:
        b = launch_browser(p, camera=True)
        page = b.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.evaluate("async () => { await window.vitPage.ready; }")
        status = page.locator("#status")

        def shows_label():
            page.wait_for_timeout(50)
            page.locator("#status:not(:has-text('Classifying'))").wait_for()
            text = status.inner_text()
            assert "error" not in (status.get_attribute("class") or ""), text
            return text

        page.locator("#file").set_input_files(str(good))
        assert shows_label().split(" (")[0] in labels + ["Not sure", "Unlike anything this model knows"]
        for name, (blob, words) in bad_files(tmp_path).items():
            (tmp_path / name).write_bytes(blob)
            page.locator("#file").set_input_files(str(tmp_path / name))
            page.locator("#status.error").wait_for()
            assert words in status.inner_text(), (name, status.inner_text())
            page.locator("#file").set_input_files(str(good))  # and the page still works
            shows_label()
        page.locator("#file").set_input_files(str(anim))
        shows_label()
        assert "first frame" in page.inner_text("#verdict")

        drop_or_paste = """async ([u, how]) => {
          const blob = await (await fetch(u)).blob();
          const dt = new DataTransfer();
          dt.items.add(new File([blob], "given.png", { type: blob.type }));
          const init = { bubbles: true, cancelable: true };
          const e = how === "drop" ? new DragEvent("drop", { ...init, dataTransfer: dt })
                                   : new ClipboardEvent("paste", { ...init, clipboardData: dt });
          document.getElementById("drop").dispatchEvent(e);
        }"""
        for how in ("drop", "paste"):
            page.evaluate("() => { document.getElementById('status').textContent = 'Classifying'; }")
            page.evaluate(drop_or_paste, [good.relative_to(site).as_posix(), how])
            shows_label()
            assert "given.png" in page.inner_text("#timing")

        page.get_by_role("button", name="Use the webcam").click()
        page.locator("#camera:not([hidden])").wait_for()
        page.wait_for_timeout(1500)  # the synthetic camera's first frames
        page.get_by_role("button", name="Take a snapshot").click()
        shows_label()
        assert "webcam snapshot" in page.inner_text("#timing")

        box = page.locator("#pad").bounding_box()  # the bundled model is one for drawings
        page.mouse.move(box["x"] + 60, box["y"] + 60)
        page.mouse.down()
        for x, y in [(260, 60), (260, 260), (60, 260), (60, 60)]:
            page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
        page.mouse.up()
        page.get_by_role("button", name="Classify the drawing").click()
        shows_label()
        assert "drawing" in page.inner_text("#timing")
        page.locator("#about summary").click()
        about = page.inner_text("#about")
        assert "Held-out test accuracy" in about and all(label in about for label in labels)
        meta = Classifier(site / "model.onnx", warmup=False).metadata
        assert f"{100 * float(meta['test_accuracy']):.2f}%" in about  # measured, never rounded up
        b.close()
    assert errors == []


def test_runtime_is_pinned_checked_and_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "onnxruntime-web.tgz"
    fake.write_bytes(b"not the package")
    with pytest.raises(ExportError, match="differs from the pinned integrity"):
        runtime_package(fake)
    with pytest.raises(ExportError, match="--runtime FILE") as e:
        runtime_package(url="http://127.0.0.1:9/onnxruntime-web.tgz")  # nothing listens on port 9
    assert "npm pack onnxruntime-web@" in str(e.value)
    assert integrity_of(b"abc").startswith("sha512-")
    # Offline, nothing is written: no half-built folder, nothing exported.
    with pytest.raises(ExportError):
        build_web(BUNDLED, tmp_path / "page", runtime=fake)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnxruntime-web.tgz"]


@pytest.mark.skipif(cached_runtime() is None, reason="needs the cached onnxruntime-web (make test fetches it)")
def test_page_folder_from_a_run_is_a_static_space(run_dir, tmp_path):
    site = build_web(run_dir, tmp_path / "page", examples=3, log=lambda *_: None)
    readme = (site / "README.md").read_text()
    assert "sdk: static" in readme and "cross-origin-embedder-policy: require-corp" in readme
    assert "Validation accuracy" in readme and f"onnxruntime-web {ORT_WEB_VERSION}" in readme
    page = json.loads((site / "page.json").read_text())
    assert len(page["examples"]) == 3 and all((site / "examples" / e["file"]).is_file() for e in page["examples"])
    assert page_weight(site) <= (site / "model.onnx").stat().st_size + 15 * 2**20
    assert lfs_misses(site) == []
    # Nothing of the page is copied from the model: labels and sizes come from the file.
    labels = Classifier(site / "model.onnx", warmup=False).labels
    page_text = "".join((site / f).read_text() for f in ("index.html", "app.js", "vit.js"))
    assert not any(f'"{label}"' in page_text for label in labels)


def lfs_misses(folder: Path) -> list[str]:
    """Binary files of ``folder`` that its .gitattributes does not send through Git LFS."""
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    binary = [p for p in folder.rglob("*") if p.is_file() and ".git" not in p.parts and b"\0" in p.read_bytes()[:8000]]
    binary += [p for p in folder.rglob("*") if p.suffix in (".onnx", ".wasm", ".png", ".jpg")]
    rels = sorted({p.relative_to(folder).as_posix() for p in binary})
    out = subprocess.run(
        ["git", "check-attr", "filter", "--", *rels], cwd=folder, capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if not line.endswith(": filter: lfs")]


def test_space_publishes_images_only_when_asked_and_puts_binaries_in_lfs(run_dir, tmp_path):
    from export.space import build_space

    private = build_space(run_dir, tmp_path / "private")
    assert not (private / "assets" / "examples").exists() or not any((private / "assets" / "examples").iterdir())
    assert lfs_misses(private) == []
    shown = build_space(run_dir, tmp_path / "shown", examples=5)
    assert len(list((shown / "assets" / "examples").iterdir())) == 5
    assert lfs_misses(shown) == []
    readme = (shown / "README.md").read_text()
    assert "sdk: gradio" in readme


def test_space_carries_the_canvas_setting_and_the_int8_file(exported, tmp_path):
    from export.onnx_export import file_metadata, int8_path, set_metadata
    from export.space import build_space

    fp32, result = exported
    if not result.get("int8", {}).get("path"):
        pytest.skip("the tiny model's int8 file did not pass its gate")
    import onnx

    src = tmp_path / "m.onnx"
    proto = onnx.load(str(fp32))
    set_metadata(proto, {"canvas": "true"})
    onnx.save(proto, str(src))
    int8_src = int8_path(src)
    int8_src.write_bytes(int8_path(fp32).read_bytes())
    carried = build_space(src, tmp_path / "carried")
    assert file_metadata(carried / "assets" / "model.onnx")["quantization"].startswith("int8")
    plain = build_space(src, tmp_path / "plain", int8=False, canvas=True)
    meta = file_metadata(plain / "assets" / "model.onnx")
    assert meta["quantization"] == "none" and meta["canvas"] == "true"
    int8_src.unlink()
    with pytest.raises(ExportError, match="int8"):
        build_space(src, tmp_path / "asked", int8=True)
    assert not (tmp_path / "asked").exists()


RESIZE = """async (cases) => {
  const v = await import("./vit.js");
  return cases.map((c) => Array.from(
    v.resizeForEval(Uint8Array.from(c.rgb), c.w, c.h, c.size, c.crop, c.interp).rgb));
}"""


@needs_page
def test_the_ported_resize_is_pillows_for_every_filter_and_extreme_shapes(page_site):
    """Every interpolation, square and other inputs, crops, and long thin images (where only
    the cropped region is resized, Pillow's box, and tall ones go vertical first)."""
    from playwright.sync_api import sync_playwright

    from vit.imageio import resize_for_eval

    rng = np.random.default_rng(3)
    cases, want = [], []
    shapes = [(1, 5000), (5000, 1), (3, 9000), (9000, 2), (64, 64), (97, 61), (17, 200), (5, 5)]
    for i in range(32):
        w, h = shapes[i % len(shapes)]
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        interp = ["bicubic", "bilinear", "nearest", "lanczos"][i % 4]
        size, crop = [(48, 48), (224, 224), (32, 64), (17, 17)][(i // 4) % 4], [1.0, 0.875, 0.9][i % 3]
        cases.append(dict(w=w, h=h, rgb=a.ravel().tolist(), size=size, crop=crop, interp=interp))
        want.append(np.asarray(resize_for_eval(Image.fromarray(a), size, crop, interp)).ravel())
    with sync_playwright() as p:
        b = launch_browser(p)
        page = b.new_page()
        page.goto(page_site[1])
        got = page.evaluate(RESIZE, cases)
        b.close()
    for c, g, w in zip(cases, got, want):
        assert np.array_equal(np.asarray(g, np.uint8), w), (c["w"], c["h"], c["size"], c["crop"], c["interp"])


@needs_page
def test_where_the_page_cannot_run_it_says_why(page_site, tmp_path):
    from playwright.sync_api import sync_playwright

    site, _ = page_site
    pointer = Path(shutil.copytree(site, tmp_path / "pages"))
    (pointer / "model.onnx").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    plain = page_server(site, port=0, isolated=False, quiet=True)  # like python -m http.server
    lfs = page_server(pointer, port=0, quiet=True)
    for s in (plain, lfs):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            b = launch_browser(p)
            page = b.new_page()
            page.goto((site / "index.html").as_uri())  # opened as a file
            assert "must be served" in page.inner_text("#status")
            page.goto(f"http://127.0.0.1:{plain.server_port}/")
            got = page.evaluate(CLASSIFY, ["examples/" + sorted(os.listdir(site / "examples"))[0]])
            assert got[0]["label"] and page.evaluate("window.vitPage.threads") == 1  # no isolation: one thread
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{lfs.server_port}/")
            page.locator("#status.error").wait_for()
            assert "Git LFS pointer" in page.inner_text("#status")
            assert "Nothing can be classified" in page.inner_text("#verdict")  # and not "still works"
            assert page.locator("#file").is_disabled() and errors == []
            b.close()
    finally:
        for s in (plain, lfs):
            s.shutdown()
            s.server_close()


@needs_page
def test_labels_are_text_and_the_front_matter_is_yaml(tmp_path):
    """Class names come from users' folder names: shown as text, never markup, and any title or
    label list gives a README whose front matter parses."""
    import onnx
    import yaml
    from playwright.sync_api import sync_playwright

    from export.onnx_export import set_metadata

    labels = json.loads(Classifier(BUNDLED, warmup=False).metadata["labels"])
    labels[:3] = ["<img src=x onerror=window.pwned=1>", "Größe: groß", "a #b"]
    proto = onnx.load(str(BUNDLED))
    set_metadata(proto, {"labels": json.dumps(labels)})
    model = tmp_path / "m.onnx"
    onnx.save(proto, str(model))
    site = build_web(model, tmp_path / "page", title="Shapes: a demo # 1", log=lambda *_: None)
    front = (site / "README.md").read_text(encoding="utf-8").split("---")[1]
    meta = yaml.safe_load(front)
    assert meta["title"] == "Shapes: a demo # 1" and meta["sdk"] == "static"
    assert meta["custom_headers"]["cross-origin-opener-policy"] == "same-origin"
    server = page_server(site, port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            b = launch_browser(p)
            page = b.new_page()
            page.goto(f"http://127.0.0.1:{server.server_port}/")
            page.evaluate("async () => { await window.vitPage.ready; }")
            page.locator("#about summary").click()
            about = page.inner_text("#about")
            assert labels[0] in about and labels[1] in about  # the markup shown as text
            assert page.evaluate("window.pwned") is None
            b.close()
    finally:
        server.shutdown()
        server.server_close()


def test_examples_are_checked_counted_and_asked_for(tmp_path, capsys):
    """Only usable images are published (each left-out file named); --examples-from needs a count."""
    from export.space import main as space_main
    from export.space import stage_examples

    src = tmp_path / "mine"
    src.mkdir()
    Image.new("RGB", (20, 20), "red").save(src / "Red.PNG")
    (src / "notes.png").write_text("not an image")
    (src / "cut.jpg").write_bytes((ROOT / "assets" / "examples" / "star.png").read_bytes()[:80])
    said = []
    picked = stage_examples(BUNDLED, tmp_path / "out", 5, src, log=said.append)
    assert [p["file"] for p in picked] == ["Red.png"]
    assert any("notes.png left out" in m for m in said) and any("cut.jpg left out" in m for m in said)
    assert any("1 example images published (5 asked for)" in m for m in said)
    with pytest.raises(SystemExit):
        space_main([str(BUNDLED), "--out", str(tmp_path / "s"), "--examples-from", str(src)])
    assert "--examples-from needs --examples N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        space_main([str(BUNDLED), "--out", str(tmp_path / "s"), "--examples", "-2"])
    assert space_main([str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.onnx").write_bytes(b"not a model" * 10)
    assert space_main([str(tmp_path / "bad.onnx"), "--out", str(tmp_path / "s")]) == 2
    assert "is not a valid ONNX file" in capsys.readouterr().err


def test_published_folders_are_readable_by_a_web_server(tmp_path):
    from export.space import build_space

    old = os.umask(0o022)
    try:
        out = build_space(BUNDLED, tmp_path / "space")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
