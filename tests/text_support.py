"""Tiny text fixtures: a random-init 2-layer BERT (a few thousand parameters) with a WordPiece tokenizer trained here
by `tokenizers`, and class folders of short generated texts whose words say their class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOPICS = {
    "animal": "dog cat horse bird fish cow sheep wolf fox bear lion tiger mouse deer goat duck",
    "food": "bread cheese apple soup rice pasta salad cake butter honey milk pear plum bean corn",
    "tool": "hammer saw drill wrench chisel spade rake axe knife needle lever pliers file clamp vise",
}
FILLER = "the a of and with in on is was very some many small large old new this that".split()


def make_texts(folder: Path, per_class: int = 8, seed: int = 0, classes: dict[str, str] | None = None) -> list[Path]:
    """folder/<class>/text_NNN.txt: a sentence of the class's words and filler words (learnable, distinct)."""
    rng = np.random.default_rng(seed)
    written = []
    for label, words in (classes or TOPICS).items():
        vocab = words.split()
        d = folder / label
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            n = int(rng.integers(4, 12))
            tokens = [str(rng.choice(vocab)) if rng.random() < 0.6 else str(rng.choice(FILLER)) for _ in range(n)]
            p = d / f"text_{i:03d}.txt"
            p.write_text(" ".join([str(rng.choice(vocab)), *tokens]) + ".\n", encoding="utf-8")
            written.append(p)
    return written


def make_encoder(folder: Path, hidden: int = 16, layers: int = 2, seed: int = 0) -> Path:
    """folder/{config.json, model.safetensors, tokenizer.json}: a random-init tiny BERT and a WordPiece tokenizer
    trained on the fixture vocabulary, in the layout of a Hugging Face model folder."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    corpus = [" ".join(TOPICS.values()), " ".join(FILLER), "abcdefghijklmnopqrstuvwxyz .,;:!?'\"-"]
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls),
                                                                                              ("[SEP]", sep)])
    tok.save(str(folder / "tokenizer.json"))
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
                        pad_token_id=tok.token_to_id("[PAD]"))
    torch.manual_seed(seed)
    BertModel(config, add_pooling_layer=False).save_pretrained(str(folder))
    return folder
