# Classify images with the exported model: onnxruntime, Pillow and numpy only (no tlops, no torch).
# Usage: python docs/onnx_snippet.py models/model.onnx image.png [more images...]
import json, math, sys
import numpy as np, onnxruntime as ort
from PIL import Image, ImageOps

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map  # labels and preprocessing travel inside the file
labels, spec = json.loads(meta["tlops.labels"]), json.loads(meta["tlops.preprocess"])
for path in sys.argv[2:]:
    img, work = Image.open(path), spec.get("decode_size", 0)  # decode at working size: JPEG DCT scaling...
    if work and img.format == "JPEG" and min(img.size) >= 2 * work:
        img.draft(None, tuple(math.ceil(d * work / min(img.size)) for d in img.size))
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # more than 8 bits: spec's intensity rule to 0..255
        a, rule, (c, wd) = np.asarray(img, np.float64), spec.get("intensity", "auto"), spec.get("window") or (0, 0)
        lo, hi = ((c - 0.5 - (wd - 1) / 2, c - 0.5 + (wd - 1) / 2) if rule == "window" else
                  (a.min(), a.max()) if rule == "minmax" else np.percentile(a, (0.5, 99.5)))
        img = Image.fromarray(np.rint((np.clip(a, lo, hi) - lo) * (255 / max(hi - lo, 1e-9))).astype(np.uint8))
    img = img.convert("RGB")
    if work and min(img.size) // work >= 2:  # ...else a whole-factor box reduction
        img = img.reduce(min(img.size) // work)
    (w, h), short, s = img.size, spec["resize_size"], spec["input_size"]
    scale = short / min(w, h)  # resize the shorter side, then centre-crop a square
    nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
    img = img.resize((nw, nh), getattr(Image.Resampling, spec["interpolation"].upper()))
    img = img.crop(((nw - s) // 2, (nh - s) // 2, (nw - s) // 2 + s, (nh - s) // 2 + s))
    x = (np.asarray(img, np.float32) / 255 - np.float32(spec["mean"])) / np.float32(spec["std"])
    logits = session.run(None, {"input": x.transpose(2, 0, 1)[None]})[0][0]
    p = np.exp(logits - logits.max()); p /= p.sum()
    print(f"{path}\t{labels[int(p.argmax())]}\t{p.max():.3f}")
