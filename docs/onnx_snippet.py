# Classify images with the exported model: onnxruntime, Pillow and numpy only (no tlops, no torch).
# Usage: python docs/onnx_snippet.py models/model.onnx image.png [more images...]
import json, sys
import numpy as np, onnxruntime as ort
from PIL import Image, ImageOps

session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map  # labels and preprocessing travel inside the file
labels, spec = json.loads(meta["tlops.labels"]), json.loads(meta["tlops.preprocess"])
for path in sys.argv[2:]:
    img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    (w, h), short, s = img.size, spec["resize_size"], spec["input_size"]
    scale = short / min(w, h)  # resize the shorter side, then centre-crop a square
    nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
    img = img.resize((nw, nh), getattr(Image.Resampling, spec["interpolation"].upper()))
    img = img.crop(((nw - s) // 2, (nh - s) // 2, (nw - s) // 2 + s, (nh - s) // 2 + s))
    x = (np.asarray(img, np.float32) / 255 - np.float32(spec["mean"])) / np.float32(spec["std"])
    logits = session.run(None, {"input": x.transpose(2, 0, 1)[None]})[0][0]
    p = np.exp(logits - logits.max()); p /= p.sum()
    print(f"{path}\t{labels[int(p.argmax())]}\t{p.max():.3f}")
