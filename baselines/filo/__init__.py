"""FiLo (ACM MM'24) as released: :mod:`.torch_model` is the computation, :mod:`.grounding` the Grounding DINO detector,
:mod:`.hqloc` the release's box logic, :mod:`.method` the suite glue, ``descriptions.yaml`` the FG-Des descriptions."""

from baselines.filo.method import FiLo
from baselines.filo.torch_model import FiLoConfig, FiLoLearnables

__all__ = ["FiLo", "FiLoConfig", "FiLoLearnables"]
