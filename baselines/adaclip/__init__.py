"""AdaCLIP (ECCV'24) as released: :mod:`.torch_model` is the computation, :mod:`.method` the suite glue."""

from baselines.adaclip.method import AdaCLIP
from baselines.adaclip.torch_model import AdaCLIPConfig, AdaCLIPModel

__all__ = ["AdaCLIP", "AdaCLIPConfig", "AdaCLIPModel"]
