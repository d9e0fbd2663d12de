// The page: loads model.onnx into onnxruntime-web (WebAssembly) and classifies what the
// visitor gives it (a file, a drop, a paste, a webcam snapshot or a drawing) exactly as
// vit.runtime does in Python. Everything it knows about the model comes from the file.
import * as ort from "./ort/ort.wasm.min.mjs";
import { modelSettings, normalise, readMetadata, resizeForEval, rgbaToRgb, sniff, softmax } from "./vit.js";

const MAX_BYTES = 10 * 2 ** 20; // as the Gradio app: 10 MB per image
const MAX_PIXELS = 40_000_000; // and 40 million decoded pixels
const TOP_K = 5;
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

class PageError extends Error {}

const state = { session: null, settings: null, meta: null, threads: 1, queue: Promise.resolve() };

// ---------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------

// The model's bytes, saying how far the download has come (the file may be tens of MB).
async function readWithProgress(res) {
  const total = Number(res.headers.get("content-length")) || 0;
  if (!res.body) return new Uint8Array(await res.arrayBuffer());
  const chunks = [];
  let got = 0;
  for (const reader = res.body.getReader(); ; ) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    got += value.length;
    const of = total ? ` of ${(total / 2 ** 20).toFixed(1)}` : "";
    setStatus(`Loading the model… ${(Math.min(got, total || got) / 2 ** 20).toFixed(1)}${of} MB`);
  }
  return new Uint8Array(await new Blob(chunks).arrayBuffer());
}

async function loadModel() {
  const name = params.get("model") || "model.onnx";
  const url = new URL(name, location.href);
  if (url.origin !== location.origin) throw new PageError("The model must be a file of this page's own folder.");
  const res = await fetch(url);
  if (!res.ok) throw new PageError(`Could not load ${name} (${res.status}): is it in this page's folder?`);
  const bytes = await readWithProgress(res);
  if (new TextDecoder().decode(bytes.subarray(0, 40)).startsWith("version https://git-lfs")) {
    throw new PageError(
      `${name} is a Git LFS pointer, not the model: this host serves LFS files as pointers (GitHub Pages does). ` +
        "Publish the folder without its .gitattributes, or on a static Hugging Face Space.",
    );
  }
  state.meta = readMetadata(bytes);
  state.settings = modelSettings(state.meta);
  const cores = navigator.hardwareConcurrency || 1;
  // Threads need SharedArrayBuffer, which browsers give only to cross-origin-isolated pages.
  state.threads = params.has("threads")
    ? Math.max(1, parseInt(params.get("threads"), 10) || 1)
    : crossOriginIsolated ? Math.min(4, cores) : 1;
  ort.env.wasm.numThreads = crossOriginIsolated ? state.threads : 1;
  state.threads = ort.env.wasm.numThreads;
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  state.session = await ort.InferenceSession.create(bytes, {
    executionProviders: ["wasm"],
    graphOptimizationLevel: "all",
  });
  return state.settings;
}

// ---------------------------------------------------------------------------------------
// Decoding: any input to upright 8-bit RGB, with a sentence for anything that is not one
// ---------------------------------------------------------------------------------------

async function decode(blob, name) {
  if (blob.size === 0) throw new PageError(`${name} is empty (0 bytes).`);
  if (blob.size > MAX_BYTES) {
    throw new PageError(`${name} is ${(blob.size / 2 ** 20).toFixed(1)} MB; the limit is 10 MB. Make it smaller first.`);
  }
  const bytes = new Uint8Array(await blob.arrayBuffer());
  const kind = sniff(bytes);
  if (!kind) {
    throw new PageError(`${name} is not an image this page can read: give a PNG, JPEG, GIF, WebP, BMP or AVIF file.`);
  }
  if (kind.unsupported) {
    throw new PageError(`${name} is a ${kind.format} image, which browsers cannot decode: convert it to PNG or JPEG.`);
  }
  const tooBig = (w, h) =>
    new PageError(`${name} is ${w}×${h} pixels, over the limit of 40 million: make it smaller first.`);
  if (kind.width * kind.height > MAX_PIXELS) throw tooBig(kind.width, kind.height);
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, {
      imageOrientation: "from-image", // EXIF orientation, as PIL's exif_transpose
      colorSpaceConversion: "none", // the file's own values, as PIL reads them
      premultiplyAlpha: "none",
    });
  } catch {
    throw new PageError(`${name} could not be decoded as ${kind.format}: the file is corrupt or truncated.`);
  }
  const { width, height } = bitmap;
  if (width * height > MAX_PIXELS) {
    bitmap.close();
    throw tooBig(width, height);
  }
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  const rgba = ctx.getImageData(0, 0, width, height).data;
  const notes = kind.animated ? ["an animated image: its first frame was classified"] : [];
  return { rgb: rgbaToRgb(rgba, width, height), width, height, notes };
}

// ---------------------------------------------------------------------------------------
// Classification (vit.runtime.Classifier.predict)
// ---------------------------------------------------------------------------------------

function preprocess(image) {
  const s = state.settings;
  const seen = resizeForEval(image.rgb, image.width, image.height, s.imageSize, s.cropPct, s.interpolation);
  return { seen, x: normalise(seen.rgb, seen.width, seen.height, s.mean, s.std) };
}

async function infer(image) {
  const s = state.settings;
  const t0 = performance.now();
  const { seen, x } = preprocess(image);
  const t1 = performance.now();
  const [H, W] = s.imageSize;
  const out = await state.session.run({ [state.session.inputNames[0]]: new ort.Tensor("float32", x, [1, 3, H, W]) });
  const t2 = performance.now();
  const probs = softmax(out.logits.data, s.temperature);
  const order = probs.map((p, i) => i).sort((a, b) => probs[b] - probs[a]);
  const oodScore = out.ood_score ? out.ood_score.data[0] : null;
  const known = s.oodThreshold === null || oodScore === null || oodScore <= s.oodThreshold;
  const sure = known && probs[order[0]] >= s.threshold;
  return {
    label: s.labels[order[0]],
    topK: order.slice(0, Math.min(TOP_K, order.length)).map((i) => [s.labels[i], probs[i]]),
    probs,
    status: !known ? "unknown" : sure ? "sure" : "unsure",
    oodScore,
    attention: out.attention ? { data: Array.from(out.attention.data), dims: out.attention.dims.slice(1) } : null,
    seen,
    ms: { preprocess: t1 - t0, model: t2 - t1 },
  };
}

// One image at a time: a WebAssembly session runs one call at a time.
function serial(fn) {
  const run = state.queue.then(fn, fn);
  state.queue = run.catch(() => {});
  return run;
}

async function classifyBlob(blob, name = "image") {
  return serial(async () => {
    const t0 = performance.now();
    const image = await decode(blob, name);
    const t1 = performance.now();
    const result = await infer(image);
    result.ms.decode = t1 - t0;
    result.notes = image.notes;
    return result;
  });
}

// ---------------------------------------------------------------------------------------
// Showing a result
// ---------------------------------------------------------------------------------------

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

const pct = (p) => `${(100 * p).toFixed(p >= 0.995 || p < 0.005 ? 0 : 1)}%`;
const pct2 = (p) => `${(100 * p).toFixed(2)}%`; // measured accuracies: never rounded up to 100%

function verdict(r) {
  const s = state.settings;
  const [label, p] = r.topK[0];
  if (r.status === "unknown") {
    return (
      `This does not look like any of the ${s.labels.length} things this model knows ` +
      `(${s.labels.join(", ")}). The closest is ${label} (${pct(p)}), but the image is unlike the ones it ` +
      "was trained on, so treat that as a guess."
    );
  }
  if (r.status === "unsure") {
    return `Not sure. The best guess is ${label} at ${pct(p)}, below this model's threshold of ${pct(s.threshold)}: it hesitates between its classes.`;
  }
  return "";
}

function drawSeen(r) {
  const canvas = $("seen");
  const { seen, attention } = r;
  const scale = Math.min(256 / seen.width, 256 / seen.height);
  canvas.width = Math.round(seen.width * scale);
  canvas.height = Math.round(seen.height * scale);
  const ctx = canvas.getContext("2d");
  const small = new OffscreenCanvas(seen.width, seen.height);
  const rgba = new ImageData(seen.width, seen.height);
  for (let i = 0, j = 0; i < seen.width * seen.height; i++, j += 3) {
    rgba.data.set([seen.rgb[j], seen.rgb[j + 1], seen.rgb[j + 2], 255], i * 4);
  }
  small.getContext("2d").putImageData(rgba, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
  if (attention) {
    const [gh, gw] = attention.dims;
    const top = Math.max(...attention.data, 1e-8);
    const heat = new ImageData(gw, gh);
    attention.data.forEach((v, i) => {
      const h = Math.min(Math.max(v / top, 0), 1); // blue (ignored) to red (attended), as the app
      heat.data.set([255 * h, 64 * h, 255 * (1 - h), 140 * h], i * 4);
    });
    const layer = new OffscreenCanvas(gw, gh);
    layer.getContext("2d").putImageData(heat, 0, 0);
    ctx.drawImage(layer, 0, 0, canvas.width, canvas.height);
  }
  $("seen-figure").hidden = false;
}

function show(r, name) {
  const [label, p] = r.topK[0];
  setStatus(r.status === "sure" ? `${label} (${pct(p)})` : r.status === "unsure" ? "Not sure" : "Unlike anything this model knows");
  $("verdict").textContent = [verdict(r), ...r.notes.map((n) => `Note: ${n}.`)].filter(Boolean).join(" ");
  const bars = $("bars");
  bars.replaceChildren(
    ...r.topK.map(([name, prob]) => {
      const li = document.createElement("li");
      const n = document.createElement("span");
      n.className = "name";
      n.textContent = name;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.display = "block";
      fill.style.width = `${(100 * prob).toFixed(1)}%`;
      bar.append(fill);
      const v = document.createElement("span");
      v.className = "p";
      v.textContent = pct(prob);
      li.append(n, bar, v);
      return li;
    }),
  );
  drawSeen(r);
  const total = r.ms.decode + r.ms.preprocess + r.ms.model;
  $("timing").textContent =
    `${name}: ${total.toFixed(1)} ms in this browser (decoding ${r.ms.decode.toFixed(1)}, preprocessing ` +
    `${r.ms.preprocess.toFixed(1)}, model ${r.ms.model.toFixed(1)}; WebAssembly, ${state.threads} ` +
    `thread${state.threads > 1 ? "s" : ""}).`;
}

function showError(e) {
  const message = e instanceof PageError ? e.message : `Something went wrong: ${e?.message ?? e}`;
  setStatus(message, true);
  $("verdict").textContent = "The page still works: try another image.";
  $("bars").replaceChildren();
  $("seen-figure").hidden = true;
  $("timing").textContent = "";
}

async function classifyAndShow(blob, name, note = "") {
  if (!state.session) {
    if (!state.failed) setStatus("The model is still loading: give the image again in a moment.", true);
    return null;
  }
  setStatus(`Classifying ${name}…`);
  try {
    const r = await classifyBlob(blob, name);
    show(r, name);
    if (note) $("verdict").textContent = `${note} ${$("verdict").textContent}`.trim();
    const box = $("result").getBoundingClientRect();
    if (box.top < 0 || box.top > innerHeight - 80) $("result").scrollIntoView({ block: "start", behavior: "smooth" });
    window.vitPage.last = r;
    return r;
  } catch (e) {
    showError(e);
    return null;
  }
}

// ---------------------------------------------------------------------------------------
// Inputs: file, drop, paste, webcam, drawing, examples
// ---------------------------------------------------------------------------------------

function fromFiles(files, how) {
  const list = Array.from(files || []);
  if (!list.length) {
    showError(new PageError(`The ${how} held no file: ${how === "paste" ? "copy an image itself, not its address" : "drop an image file"}, and try again.`));
    return;
  }
  classifyAndShow(list[0], list[0].name || "pasted image").then((r) => {
    if (r && list.length > 1) $("verdict").textContent += ` ${list.length} files were given: the first one was classified.`;
  });
}

function wireInputs() {
  $("file").addEventListener("change", (e) => {
    fromFiles(e.target.files, "file");
    e.target.value = "";
  });
  document.addEventListener("paste", (e) => {
    const files = Array.from(e.clipboardData?.files || []);
    if (!files.length && (e.target.closest?.("input, textarea") ?? false)) return;
    e.preventDefault();
    fromFiles(files, "paste");
  });
  wireCamera();
  if (state.settings.canvas) wireDrawing();
}

function wireCamera() {
  let stream = null;
  const close = () => {
    stream?.getTracks().forEach((t) => t.stop());
    stream = null;
    $("camera").hidden = true;
  };
  $("camera-open").addEventListener("click", async () => {
    if (!navigator.mediaDevices?.getUserMedia) {
      showError(new PageError("The webcam needs the page to be served over https or from localhost."));
      return;
    }
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    } catch (e) {
      const why = e.name === "NotAllowedError" ? "the browser was not allowed to use it" : e.name === "NotFoundError" ? "no webcam was found" : e.message;
      showError(new PageError(`The webcam could not be opened: ${why}.`));
      return;
    }
    $("video").srcObject = stream;
    $("camera").hidden = false;
  });
  $("camera-close").addEventListener("click", close);
  $("snap").addEventListener("click", async () => {
    const video = $("video");
    if (!video.videoWidth) {
      showError(new PageError("The webcam has not sent a picture yet: wait a moment and try again."));
      return;
    }
    const canvas = new OffscreenCanvas(video.videoWidth, video.videoHeight);
    canvas.getContext("2d").drawImage(video, 0, 0);
    await classifyAndShow(await canvas.convertToBlob({ type: "image/png" }), "webcam snapshot");
  });
}

function wireDrawing() {
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  let drawn = false;
  const clear = () => {
    ctx.fillStyle = "white";
    ctx.fillRect(0, 0, pad.width, pad.height);
    drawn = false;
  };
  clear();
  const at = (e) => {
    const r = pad.getBoundingClientRect();
    return [((e.clientX - r.left) * pad.width) / r.width, ((e.clientY - r.top) * pad.height) / r.height];
  };
  let last = null;
  pad.addEventListener("pointerdown", (e) => {
    pad.setPointerCapture(e.pointerId);
    last = at(e);
  });
  pad.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = at(e);
    Object.assign(ctx, { strokeStyle: "black", lineWidth: 12, lineCap: "round", lineJoin: "round" });
    ctx.beginPath();
    ctx.moveTo(...last);
    ctx.lineTo(...p);
    ctx.stroke();
    last = p;
    drawn = true;
  });
  for (const type of ["pointerup", "pointercancel"]) pad.addEventListener(type, () => (last = null));
  $("draw-clear").addEventListener("click", clear);
  $("draw-go").addEventListener("click", async () => {
    if (!drawn) {
      showError(new PageError("Draw something on the pad first."));
      return;
    }
    const blob = await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
    await classifyAndShow(blob, "drawing");
  });
  $("draw").hidden = false;
}

async function loadPage() {
  try {
    const res = await fetch("page.json");
    return res.ok ? await res.json() : {};
  } catch {
    return {};
  }
}

function showExamples(examples) {
  if (!examples?.length) return;
  const list = $("example-list");
  for (const ex of examples) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = ex.label ? `${ex.file} (${ex.label})` : ex.file;
    const img = document.createElement("img");
    img.src = `examples/${encodeURIComponent(ex.file)}`;
    img.alt = button.title;
    button.append(img);
    button.addEventListener("click", async () => {
      const res = await fetch(img.src);
      await classifyAndShow(await res.blob(), ex.file, `Example ${ex.file}${ex.label ? ` (a ${ex.label})` : ""}:`);
    });
    list.append(button);
  }
  $("examples").hidden = false;
}

// ---------------------------------------------------------------------------------------
// About this model: the file's metadata, for a person
// ---------------------------------------------------------------------------------------

function about() {
  const m = state.meta;
  const s = state.settings;
  const rows = [
    ["Classes", `${s.labels.length}: ${s.labels.join(", ")}`],
    ["Input", `${s.imageSize[0]}×${s.imageSize[1]} px; resize (${s.interpolation}), centre crop ${s.cropPct.toFixed(3)}, mean ${m.mean}, std ${m.std}`],
  ];
  if (m.model_config) {
    const c = JSON.parse(m.model_config);
    rows.push(["Architecture", `ViT: ${c.depth} blocks, width ${c.dim}, ${c.heads} heads, patch ${c.patch_size}, pooling by ${c.pool}${c.mirror_average ? "; each prediction averages the image's and its mirror's logits" : ""}${parseInt(m.models || "1", 10) > 1 ? `; an ensemble of ${m.models} models, logits averaged` : ""}`]);
  }
  if (m.test_accuracy) rows.push(["Held-out test accuracy", `${pct2(parseFloat(m.test_accuracy))} on ${m.test_images} images never used for any choice`]);
  if (m.val_accuracy) rows.push(["Validation accuracy", `${pct2(parseFloat(m.val_accuracy))} (the split that chose the epoch and the thresholds)`]);
  const ece = (v) => parseFloat(v).toPrecision(2);
  if (m.ece) rows.push(["Calibration", `temperature ${s.temperature.toFixed(3)}; expected calibration error ${ece(m.ece)}${m.ece_uncalibrated ? ` (${ece(m.ece_uncalibrated)} before)` : ""}`]);
  rows.push(['"Not sure" below', `${pct(s.threshold)} top probability${m.threshold_rule ? ` (${m.threshold_rule})` : ""}`]);
  if (s.oodThreshold !== null && state.session.outputNames.includes("ood_score")) {
    const rates = m.ood_known_rates ? JSON.parse(m.ood_known_rates) : {};
    const measured = Object.entries(rates).map(([k, v]) => `${k} ${(100 * v).toFixed(1)}%`).join(", ");
    rows.push(["Unlike its classes", `score above ${s.oodThreshold.toFixed(2)}; answered as known, measured at export: ${measured || "not recorded"}`]);
  }
  rows.push(["Weights", `${m.initialization ?? "not recorded"}; ${m.quantization && m.quantization !== "none" ? m.quantization : "fp32"}`]);
  if (m.exported_at) rows.push(["Exported", m.exported_at]);
  if (m.weights_sha256) rows.push(["SHA-256 of the weights", m.weights_sha256]);
  rows.push(["Runtime", `onnxruntime-web ${ort.env.versions?.web ?? ""}, WebAssembly, ${state.threads} thread${state.threads > 1 ? "s" : ""}`]);
  $("about-body").replaceChildren(
    ...rows.flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      return [dt, dd];
    }),
  );
}

// ---------------------------------------------------------------------------------------
// Start
// ---------------------------------------------------------------------------------------

window.addEventListener("unhandledrejection", (e) => {
  if (!state.failed) showError(e.reason);
});

// Wired before the model loads: a file dropped early must never make the browser navigate
// away to it.
for (const type of ["dragenter", "dragover"]) {
  document.addEventListener(type, (e) => {
    e.preventDefault();
    $("drop").classList.add("over");
  });
}
document.addEventListener("dragleave", () => $("drop").classList.remove("over"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  fromFiles(e.dataTransfer?.files, "drop");
});

async function start() {
  $("ort-version").textContent = ort.env.versions?.web ?? "";
  const [page] = await Promise.all([loadPage(), loadModel()]);
  if (page.title) {
    document.title = page.title;
    $("title").textContent = page.title;
  }
  about();
  wireInputs();
  showExamples(page.examples);
  setStatus(`Ready: ${state.settings.labels.length} classes. Give it an image.`);
  const first = page.examples?.[0];
  if (first) {
    const res = await fetch(`examples/${encodeURIComponent(first.file)}`);
    const note = `An example, ${first.file}, to start with: give your own image.`;
    if (await classifyAndShow(await res.blob(), first.file, note)) window.vitPage.firstAnswerMs = performance.now();
  }
  return state.settings;
}

// For tests and benchmarks: the same functions the page uses.
window.vitPage = {
  classifyBlob,
  async preprocessBlob(blob) {
    return Array.from(preprocess(await decode(blob, "image")).x);
  },
  // The model call alone, back to back on one preprocessed image (as a benchmark times Python's).
  async timeModel(blob, reps) {
    const { x } = preprocess(await decode(blob, "image"));
    const [H, W] = state.settings.imageSize;
    const feeds = { [state.session.inputNames[0]]: new ort.Tensor("float32", x, [1, 3, H, W]) };
    const times = [];
    await serial(async () => {
      for (let i = 0; i < reps; i++) {
        const t0 = performance.now();
        await state.session.run(feeds);
        times.push(performance.now() - t0);
      }
    });
    return times;
  },
  get threads() {
    return state.threads;
  },
  firstAnswerMs: null,
  last: null,
};
window.vitPage.ready = start().catch((e) => {
  // Nothing works without the model: say why, switch the inputs off, and do not claim otherwise.
  setStatus(e instanceof PageError ? e.message : `The model could not be loaded: ${e?.message ?? e}`, true);
  $("verdict").textContent = "Nothing can be classified until the model loads: reload the page once it is fixed.";
  for (const el of document.querySelectorAll("#inputs button, #inputs input")) el.disabled = true;
  state.failed = true;
  throw e;
});
window.vitPage.ready.catch(() => {}); // said above; not an unhandled rejection
