"""AA-CLIP (CVPR'25), as released: the computation in :mod:`.torch_model`, the suite method in :mod:`.method`
(registered as ``aaclip``), the class descriptions and domains in :mod:`.class_names`."""

from baselines.aaclip.method import AACLIP
from baselines.aaclip.torch_model import AACLIPAdapters, AACLIPConfig, AACLIPModel

__all__ = ["AACLIP", "AACLIPAdapters", "AACLIPConfig", "AACLIPModel"]
