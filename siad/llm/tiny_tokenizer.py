"""The tiny byte-level BPE tokenizer that ships with the repo for the demo LLM and the tests.

The paper profile uses Vicuna's own SentencePiece tokenizer; the demo needs one that works offline, so a
small byte-level BPE is trained once on a corpus of the strings the conversation uses (markers, questions,
answers, position words, class descriptions) and committed as ``tokenizer/tiny-llama-tokenizer.json``.
Byte-level means every string round-trips; the corpus only decides which strings get short encodings
("Yes" and "No" must be single tokens so that :func:`siad.llm.generation.yes_probability` reads one
logit each). Special tokens follow LLaMA: ``<unk>`` = 0, ``<s>`` (BOS) = 1, ``</s>`` (EOS) = 2, pad = EOS.

Regenerate with ``python -m siad.llm.tiny_tokenizer`` (deterministic: same corpus → same file).
"""

from __future__ import annotations

import json
from pathlib import Path

from siad.errors import MissingWeightsError

__all__ = [
    "TINY_TOKENIZER_PATH",
    "TINY_VOCAB_SIZE",
    "build_tiny_tokenizer_json",
    "load_tiny_tokenizer",
    "tokenizer_corpus",
    "write_tiny_tokenizer",
]

TINY_TOKENIZER_PATH = Path(__file__).with_name("tokenizer") / "tiny-llama-tokenizer.json"
TINY_VOCAB_SIZE = 640
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

_POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
_CLASSES = (
    # MVTec AD
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper",
    # VisA
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni", "pcb", "pipe fryum", "object",
)  # fmt: skip


def tokenizer_corpus() -> list[str]:
    """The training corpus: every conversation piece, answer form and class description, in a fixed order."""
    lines = ["### Human: <Img>", "</Img> ", "\n### Assistant:", "\n###", "Yes", "No", "Yes,", "No,"]
    for name in _CLASSES:
        lines.append(
            f"This is a photo of a {name} for anomaly detection, which should be without any damage, flaw, "
            "defect, scratch, hole or broken part. Is there any anomaly in the image?"
        )
    lines += ["No, there is no anomaly in the image.\n###", "No, there are no anomalies in the image.\n###"]
    for pos in _POSITIONS:
        lines.append(f"Yes, there is an anomaly in the image, at the {pos} of the image.\n###")
        lines.append(f"Yes, there are 2 anomalies in the image, they are at the {pos} and {pos} of the image.\n###")
    return lines


def build_tiny_tokenizer_json() -> str:
    """Train the byte-level BPE on :func:`tokenizer_corpus` and return its JSON (sorted keys, stable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so frequent pieces ("Yes", "No", markers) win the merges deterministically.
    tok.train_from_iterator(tokenizer_corpus() * 4, trainer=trainer)
    return json.dumps(json.loads(tok.to_str()), sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def write_tiny_tokenizer(path: Path = TINY_TOKENIZER_PATH) -> Path:
    """Regenerate the committed tokenizer file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_tiny_tokenizer_json(), encoding="utf-8")
    return path


def load_tiny_tokenizer(path: Path = TINY_TOKENIZER_PATH):  # -> PreTrainedTokenizerFast
    """The committed tokenizer as a ``PreTrainedTokenizerFast`` with LLaMA's special ids and pad = EOS."""
    from transformers import PreTrainedTokenizerFast

    if not path.is_file():
        raise MissingWeightsError(
            f"tiny demo tokenizer {path} is missing; regenerate it with `python -m siad.llm.tiny_tokenizer`."
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tok.padding_side = "right"
    return tok


if __name__ == "__main__":
    print(write_tiny_tokenizer())
