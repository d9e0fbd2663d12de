// The page's model logic, with no DOM: the ONNX file's metadata, what a file is (read from
// its bytes, before anything decodes it), and the evaluation preprocessing of vit/imageio.py,
// pixel for pixel: Pillow's resampling (fixed-point, horizontal pass then vertical, 8-bit in
// between), torchvision's rounding of the resize and timm's centre crop.

// ---------------------------------------------------------------------------------------
// ONNX metadata: ModelProto field 14 (metadata_props), read straight from the protobuf.
// onnxruntime-web does not expose a model's custom metadata, and the file is the one source
// of truth for labels, sizes, normalisation, temperature and thresholds.
// ---------------------------------------------------------------------------------------

function varint(buf, pos) {
  let value = 0;
  let scale = 1;
  for (;;) {
    if (pos >= buf.length) throw new Error("truncated ONNX file");
    const b = buf[pos++];
    value += (b & 0x7f) * scale;
    if (b < 0x80) return [value, pos];
    scale *= 128;
  }
}

function fields(buf, start, end, onField) {
  let pos = start;
  while (pos < end) {
    let key;
    [key, pos] = varint(buf, pos);
    const field = Math.floor(key / 8);
    const wire = key & 7;
    if (wire === 0) [, pos] = varint(buf, pos);
    else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else if (wire === 2) {
      let len;
      [len, pos] = varint(buf, pos);
      if (pos + len > end) throw new Error("truncated ONNX file");
      onField(field, pos, pos + len);
      pos += len;
    } else throw new Error("not an ONNX file");
  }
}

export function readMetadata(bytes) {
  const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const text = new TextDecoder();
  const meta = {};
  fields(buf, 0, buf.length, (field, s, e) => {
    if (field !== 14) return;
    let key = "";
    let value = "";
    fields(buf, s, e, (f, a, b) => {
      if (f === 1) key = text.decode(buf.subarray(a, b));
      if (f === 2) value = text.decode(buf.subarray(a, b));
    });
    meta[key] = value;
  });
  return meta;
}

const REQUIRED = ["labels", "image_size", "mean", "std", "interpolation", "crop_pct"];

// The model's settings, parsed from its metadata (as vit/runtime.py's Classifier reads them).
export function modelSettings(meta) {
  const missing = REQUIRED.filter((k) => !(k in meta));
  if (missing.length) {
    throw new Error(`the model file lacks ${missing.join(", ")}: export it with python -m export`);
  }
  return {
    labels: JSON.parse(meta.labels),
    imageSize: JSON.parse(meta.image_size),
    mean: JSON.parse(meta.mean),
    std: JSON.parse(meta.std),
    interpolation: meta.interpolation,
    cropPct: parseFloat(meta.crop_pct),
    temperature: parseFloat(meta.temperature ?? "1"),
    threshold: parseFloat(meta.threshold ?? "0"),
    oodThreshold: "ood_threshold" in meta ? parseFloat(meta.ood_threshold) : null,
    canvas: meta.canvas === "true",
  };
}

// ---------------------------------------------------------------------------------------
// What a file is, from its first bytes: format, size in pixels, animation. A file that is
// not an image, or one too large to decode, is refused before the browser decodes it.
// ---------------------------------------------------------------------------------------

const u16be = (b, i) => (b[i] << 8) | b[i + 1];
const u16le = (b, i) => b[i] | (b[i + 1] << 8);
const u32be = (b, i) => b[i] * 2 ** 24 + ((b[i + 1] << 16) | (b[i + 2] << 8) | b[i + 3]);
const u32le = (b, i) => b[i] + b[i + 1] * 2 ** 8 + b[i + 2] * 2 ** 16 + b[i + 3] * 2 ** 24;
const ascii = (b, i, n) => String.fromCharCode(...b.subarray(i, i + n));

function png(b) {
  const info = { format: "PNG", width: u32be(b, 16), height: u32be(b, 20), animated: false };
  for (let pos = 8; pos + 8 <= b.length; ) {
    const len = u32be(b, pos);
    const type = ascii(b, pos + 4, 4);
    if (type === "acTL") info.animated = u32be(b, pos + 8) > 1;
    if (type === "IDAT" || type === "IEND") break;
    pos += 12 + len;
  }
  return info;
}

function jpeg(b) {
  for (let pos = 2; pos + 9 < b.length; ) {
    if (b[pos] !== 0xff) return { format: "JPEG", width: 0, height: 0, animated: false };
    const marker = b[pos + 1];
    if (marker === 0xff) {
      pos += 1;
      continue;
    }
    const sof = marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker);
    if (sof) return { format: "JPEG", width: u16be(b, pos + 7), height: u16be(b, pos + 5), animated: false };
    if (marker === 0xd8 || (marker >= 0xd0 && marker <= 0xd7)) pos += 2;
    else pos += 2 + u16be(b, pos + 2);
  }
  return { format: "JPEG", width: 0, height: 0, animated: false };
}

function gif(b) {
  const info = { format: "GIF", width: u16le(b, 6), height: u16le(b, 8), animated: false };
  let pos = 13;
  if (b[10] & 0x80) pos += 3 * 2 ** ((b[10] & 7) + 1);
  let frames = 0;
  const skipBlocks = (p) => {
    while (p < b.length && b[p] !== 0) p += b[p] + 1;
    return p + 1;
  };
  while (pos < b.length) {
    const kind = b[pos];
    if (kind === 0x21) pos = skipBlocks(pos + 2);
    else if (kind === 0x2c) {
      frames += 1;
      if (frames > 1) break;
      const flags = b[pos + 9];
      pos += 10;
      if (flags & 0x80) pos += 3 * 2 ** ((flags & 7) + 1);
      pos = skipBlocks(pos + 1);
    } else break;
  }
  info.animated = frames > 1;
  return info;
}

function webp(b) {
  const chunk = ascii(b, 12, 4);
  if (chunk === "VP8X") {
    return {
      format: "WEBP",
      width: 1 + (b[24] | (b[25] << 8) | (b[26] << 16)),
      height: 1 + (b[27] | (b[28] << 8) | (b[29] << 16)),
      animated: (b[20] & 0x02) !== 0,
    };
  }
  if (chunk === "VP8L") {
    const bits = u32le(b, 21);
    return { format: "WEBP", width: 1 + (bits & 0x3fff), height: 1 + ((bits >>> 14) & 0x3fff), animated: false };
  }
  return { format: "WEBP", width: u16le(b, 26) & 0x3fff, height: u16le(b, 28) & 0x3fff, animated: false };
}

function bmp(b) {
  const height = b[22] | (b[23] << 8) | (b[24] << 16) | (b[25] << 24);
  return { format: "BMP", width: Math.abs(b[18] | (b[19] << 8) | (b[20] << 16) | (b[21] << 24)), height: Math.abs(height), animated: false };
}

// {format, width, height, animated} for the formats a browser decodes; {format, unsupported}
// for images it cannot; null for anything else.
export function sniff(bytes) {
  const b = bytes;
  if (b.length < 12) return null;
  if (b[0] === 0x89 && ascii(b, 1, 3) === "PNG" && b.length >= 24) return png(b);
  if (b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return jpeg(b);
  if (ascii(b, 0, 4) === "GIF8" && b.length >= 13) return gif(b);
  if (ascii(b, 0, 4) === "RIFF" && ascii(b, 8, 4) === "WEBP" && b.length >= 30) return webp(b);
  if (ascii(b, 0, 2) === "BM" && b.length >= 26) return bmp(b);
  if (ascii(b, 4, 4) === "ftyp") {
    const brand = ascii(b, 8, 4);
    if (brand === "avif" || brand === "avis") return { format: "AVIF", width: 0, height: 0, animated: brand === "avis" };
    if (["heic", "heix", "hevc", "mif1", "msf1"].includes(brand)) return { format: "HEIC", unsupported: true };
  }
  if ((ascii(b, 0, 2) === "II" && b[2] === 42) || (ascii(b, 0, 2) === "MM" && b[3] === 42)) {
    return { format: "TIFF", unsupported: true };
  }
  if (b[0] === 0 && b[1] === 0 && b[2] === 1 && b[3] === 0) return { format: "ICO", width: 0, height: 0, animated: false };
  return null;
}

// ---------------------------------------------------------------------------------------
// Pillow's resampling (libImaging/Resample.c), exactly: the same filters and supports, the
// same coefficients rounded to 22-bit fixed point, a horizontal pass then a vertical one,
// each rounded and clipped to 8 bits. NEAREST is Pillow's affine nearest-neighbour.
// ---------------------------------------------------------------------------------------

const PRECISION_BITS = 32 - 8 - 2;
const LARGE_RESIZE = 2 ** 22; // as vit/imageio.py: beyond this (and 16 inputs), resize only the crop
const ONE = 2 ** PRECISION_BITS;
const HALF = 2 ** (PRECISION_BITS - 1);

function sinc(x) {
  if (x === 0.0) return 1.0;
  x *= Math.PI;
  return Math.sin(x) / x;
}

const FILTERS = {
  bilinear: { support: 1.0, f: (x) => (x < 0 ? -x : x) < 1.0 ? 1.0 - Math.abs(x) : 0.0 },
  bicubic: {
    support: 2.0,
    f: (x) => {
      const a = -0.5;
      if (x < 0.0) x = -x;
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    },
  },
  lanczos: { support: 3.0, f: (x) => (-3.0 <= x && x < 3.0 ? sinc(x) * sinc(x / 3) : 0.0) },
};

// precompute_coeffs: for each output pixel, the source range and its fixed-point weights.
// in0 and in1 bound the source region (Pillow's box, float32 in its C code).
function coefficients(inSize, in0, in1, outSize, filter) {
  const scale = Math.fround(in1 - in0) / outSize;
  const filterscale = Math.max(scale, 1.0);
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Float64Array(outSize * ksize);
  const k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = in0 + (xx + 0.5) * scale;
    const ss = 1.0 / filterscale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let ww = 0.0;
    for (let x = 0; x < xmax; x++) {
      k[x] = filter.f((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (let x = 0; x < xmax; x++) {
      const w = ww !== 0.0 ? k[x] / ww : k[x];
      kk[xx * ksize + x] = w < 0 ? Math.trunc(-0.5 + w * ONE) : Math.trunc(0.5 + w * ONE);
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

const clip8 = (v) => (v >= ONE * 256 ? 255 : v <= 0 ? 0 : Math.floor(v / ONE));

// The horizontal pass over source rows [y0, y1) of an RGB image.
function horizontal(src, w, y0, y1, outW, c) {
  const out = new Uint8Array(outW * (y1 - y0) * 3);
  for (let y = y0; y < y1; y++) {
    const row = y * w * 3;
    for (let xx = 0; xx < outW; xx++) {
      const xmin = c.bounds[xx * 2];
      const xmax = c.bounds[xx * 2 + 1];
      const base = xx * c.ksize;
      let s0 = HALF;
      let s1 = HALF;
      let s2 = HALF;
      for (let x = 0; x < xmax; x++) {
        const k = c.kk[base + x];
        const p = row + (x + xmin) * 3;
        s0 += src[p] * k;
        s1 += src[p + 1] * k;
        s2 += src[p + 2] * k;
      }
      const o = ((y - y0) * outW + xx) * 3;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
    }
  }
  return out;
}

// The vertical pass; source row indices are offset by y0 (the first row the pass reads).
function vertical(src, w, y0, outH, c) {
  const out = new Uint8Array(w * outH * 3);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = c.bounds[yy * 2] - y0;
    const ymax = c.bounds[yy * 2 + 1];
    const base = yy * c.ksize;
    for (let x = 0; x < w; x++) {
      let s0 = HALF;
      let s1 = HALF;
      let s2 = HALF;
      for (let y = 0; y < ymax; y++) {
        const k = c.kk[base + y];
        const p = ((y + ymin) * w + x) * 3;
        s0 += src[p] * k;
        s1 += src[p + 1] * k;
        s2 += src[p + 2] * k;
      }
      const o = (yy * w + x) * 3;
      out[o] = clip8(s0);
      out[o + 1] = clip8(s1);
      out[o + 2] = clip8(s2);
    }
  }
  return out;
}

// ImagingScaleAffine (Pillow's nearest resize): source coordinates by repeated addition from
// half a step, truncated.
function nearest(src, w, h, outW, outH, box) {
  const out = new Uint8Array(outW * outH * 3);
  const sx = Math.fround(box[2] - box[0]) / outW;
  const sy = Math.fround(box[3] - box[1]) / outH;
  const xin = new Int32Array(outW);
  for (let x = 0, xo = box[0] + sx * 0.5; x < outW; x++, xo += sx) xin[x] = Math.min(Math.trunc(xo), w - 1);
  for (let y = 0, yo = box[1] + sy * 0.5; y < outH; y++, yo += sy) {
    const row = Math.min(Math.trunc(yo), h - 1) * w;
    for (let x = 0; x < outW; x++) {
      const p = (row + xin[x]) * 3;
      const o = (y * outW + x) * 3;
      out[o] = src[p];
      out[o + 1] = src[p + 1];
      out[o + 2] = src[p + 2];
    }
  }
  return out;
}

// One resize of Pillow's C core (ImagingResample, or the affine nearest-neighbour).
function resizeCore(rgb, w, h, outW, outH, interpolation, b) {
  if (interpolation === "nearest") return nearest(rgb, w, h, outW, outH, b);
  const filter = FILTERS[interpolation];
  if (!filter) throw new Error(`unknown interpolation ${interpolation}`);
  const needH = outW !== w || b[0] !== 0 || b[2] !== w;
  const needV = outH !== h || b[1] !== 0 || b[3] !== h;
  const cv = coefficients(h, b[1], b[3], outH, filter);
  const y0 = cv.bounds[0];
  const y1 = cv.bounds[outH * 2 - 2] + cv.bounds[outH * 2 - 1];
  let img = rgb;
  let cur = w;
  let first = 0;
  if (needH) {
    img = horizontal(img, w, needV ? y0 : 0, needV ? y1 : h, outW, coefficients(w, b[0], b[2], outW, filter));
    cur = outW;
    first = needV ? y0 : 0;
  }
  return needV ? vertical(img, cur, first, outH, cv) : img;
}

// PIL's Image.resize((outW, outH), filter, box) of an RGB image (Uint8Array, w*h*3); box is
// the source region [x0, y0, x1, y1], the whole image by default.
export function resize(rgb, w, h, outW, outH, interpolation, box = null) {
  const b = (box ?? [0, 0, w, h]).map(Math.fround);
  if (outW === w && outH === h && b[0] === 0 && b[1] === 0 && b[2] === w && b[3] === h) return rgb;
  if (h > w * 100 && outH < h) {
    // As Pillow 12 does (vit/imageio.py runs on it): a very tall image shrinking in height is
    // resized vertically first.
    const tall = resizeCore(rgb, w, h, w, outH, interpolation, [0, b[1], w, b[3]]);
    return resizeCore(tall, w, outH, outW, outH, interpolation, [b[0], 0, b[2], outH]);
  }
  return resizeCore(rgb, w, h, outW, outH, interpolation, b);
}

// Python's round(): halves go to the even neighbour.
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// vit.imageio.resize_for_eval: torchvision's resize of the shorter side (square inputs) or
// of both sides (others) to size / crop_pct, then the centre crop. -> {rgb, width, height}
export function resizeForEval(rgb, w, h, size, cropPct, interpolation) {
  const [H, W] = size;
  let newW;
  let newH;
  if (H === W) {
    const short = Math.floor(H / cropPct);
    if (w <= h) [newW, newH] = [short, Math.trunc((short * h) / w)];
    else [newW, newH] = [Math.trunc((short * w) / h), short];
  } else {
    [newW, newH] = [Math.floor(W / cropPct), Math.floor(H / cropPct)];
  }
  const top = roundHalfEven((newH - H) / 2);
  const left = roundHalfEven((newW - W) / 2);
  if (newW * newH > Math.max(16 * H * W, LARGE_RESIZE)) {
    // A very long, thin image would be resized to gigabytes before the crop: only the region
    // the crop keeps is resized, as vit/imageio.py does (Pillow's box).
    const [sx, sy] = [w / newW, h / newH];
    const box = [left * sx, top * sy, (left + W) * sx, (top + H) * sy];
    return { rgb: resize(rgb, w, h, W, H, interpolation, box), width: W, height: H };
  }
  const resized = resize(rgb, w, h, newW, newH, interpolation);
  const out = new Uint8Array(W * H * 3); // PIL's crop pads with black outside the image
  for (let y = 0; y < H; y++) {
    const sy = y + top;
    if (sy < 0 || sy >= newH) continue;
    for (let x = 0; x < W; x++) {
      const sx = x + left;
      if (sx < 0 || sx >= newW) continue;
      const p = (sy * newW + sx) * 3;
      const o = (y * W + x) * 3;
      out[o] = resized[p];
      out[o + 1] = resized[p + 1];
      out[o + 2] = resized[p + 2];
    }
  }
  return { rgb: out, width: W, height: H };
}

// RGBA from a canvas -> RGB, transparency composited over white as vit.imageio.to_rgb does.
export function rgbaToRgb(rgba, w, h) {
  const out = new Uint8Array(w * h * 3);
  for (let i = 0, j = 0; i < w * h * 4; i += 4, j += 3) {
    const a = rgba[i + 3];
    if (a === 255) {
      out[j] = rgba[i];
      out[j + 1] = rgba[i + 1];
      out[j + 2] = rgba[i + 2];
    } else {
      for (let c = 0; c < 3; c++) out[j + c] = Math.round((rgba[i + c] * a + 255 * (255 - a)) / 255);
    }
  }
  return out;
}

// (H, W, 3) uint8 -> (3, H, W) float32, (x / 255 - mean) / std, as vit.imageio.preprocess.
export function normalise(rgb, width, height, mean, std) {
  const plane = width * height;
  const out = new Float32Array(3 * plane);
  const m = mean.map(Math.fround);
  const s = std.map(Math.fround);
  for (let i = 0; i < plane; i++) {
    for (let c = 0; c < 3; c++) {
      const v = Math.fround(rgb[i * 3 + c] / 255);
      out[c * plane + i] = Math.fround(Math.fround(v - m[c]) / s[c]);
    }
  }
  return out;
}

export function softmax(logits, temperature) {
  const z = Array.from(logits, (v) => v / temperature);
  const top = Math.max(...z);
  const e = z.map((v) => Math.exp(v - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}
