"""AnomalyCLIP (ICLR'24), as released: the computation in :mod:`.torch_model`, the suite method in :mod:`.method`
(registered as ``anomalyclip``)."""

from baselines.anomalyclip.method import AnomalyCLIP
from baselines.anomalyclip.torch_model import AnomalyCLIPConfig, AnomalyCLIPModel, PromptLearner

__all__ = ["AnomalyCLIP", "AnomalyCLIPConfig", "AnomalyCLIPModel", "PromptLearner"]
