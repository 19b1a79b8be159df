# Usage: python docs/onnx_text_snippet.py models/model.onnx "a text to classify" [more texts...]
# Needs only onnxruntime and tokenizers: the tokenizer, its limits and the labels are in the model file.
import json
import re
import sys
import unicodedata

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = sess.get_modelmeta().custom_metadata_map
labels, spec = json.loads(meta["tlops.labels"]), json.loads(meta["tlops.preprocess"])
tok = Tokenizer.from_str(meta["tlops.tokenizer"])
tok.no_truncation()
tok.no_padding()
for text in sys.argv[2:]:
    clean = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()  # NFC, whitespace runs to one space
    clean = clean[: spec["max_chars"]].rstrip() if spec["max_chars"] else clean
    enc = tok.encode(clean)
    ids = enc.ids
    if len(ids) > spec["max_tokens"]:  # cut to max_tokens, keeping the closing special token ([SEP])
        ids = ids[: spec["max_tokens"] - 1] + ids[-1:] if enc.special_tokens_mask[-1] else ids[: spec["max_tokens"]]
    logits = sess.run(["logits"], {"input": np.array([ids], dtype=np.int64)})[0][0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    print(f"{labels[int(p.argmax())]}\t{p.max():.3f}\t{text}")
