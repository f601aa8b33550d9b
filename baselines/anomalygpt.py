"""AnomalyGPT (Gu et al., AAAI 2024) as released (CASIA-IVA-Lab/AnomalyGPT @f21c51b), trained under UZAD.

The computation lives in :class:`siad.methods.llm_detector.LlmDetector`, which SIAD-LLM extends: the frozen
ImageBind-Huge image tower (4 stage taps), the trainable stage decoder and convolutional prompt learner, the
frozen Vicuna-7B v0 + PandaGPT LLM, NSA pseudo-anomalies with AnomalyGPT's per-class settings, and
loss = CE + Σ_stages (focal + dice). Image score = max of the map; the LLM's yes/no answer is reported as an
accuracy beside AUROC, with the unparsed rate and the AUROC of P("Yes").

Training answers as released: one anomaly per pasted patch in paste order (``answer_regions: patches``), so a patch
the 0.3 label threshold splits or empties is still one anomaly; the release's sentence builder is reproduced,
including its unfinished sentence for 3+ anomalies (never met with its 2 patches).

Differences from the reference, all switches or documented in docs/method_notes.md: greedy decoding by default
(the reference samples with top_p 0.1/0.01: ``do_sample: true``); the map is the zero-shot text map (the
reference test scripts' default is the one-normal-shot memory map); PandaGPT's instruction batches are not
interleaved (the data is not available offline); images are squash-resized at test as in training (the
reference centre-crops at test); every answer position comes from its own patch's box (the release takes the 2nd
from the running union box, a bug: ``answer_regions: patches_union_box``).
"""

from __future__ import annotations

from siad.methods.base import METHODS
from siad.methods.llm_detector import LlmDetector

__all__ = ["AnomalyGPT"]


@METHODS.register("anomalygpt")
class AnomalyGPT(LlmDetector):
    """AnomalyGPT: the shared LLM detector with its released defaults (see :data:`LLM_DEFAULTS`)."""
