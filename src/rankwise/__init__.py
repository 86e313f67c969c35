"""rankwise: choose the LoRA rank for a model and data, with the evidence.

>>> import rankwise
>>> sorted(rankwise.__all__)
['Options', 'SearchResult', 'estimate', 'search']
"""

from rankwise.config import Options
from rankwise.io.quantize import hold_back_bitsandbytes
from rankwise.study.study import SearchResult, search

hold_back_bitsandbytes()  # bitsandbytes only for a quantized base (rankwise.io.quantize)

__all__ = ["search", "SearchResult", "Options", "estimate"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "estimate":  # imports torch and transformers: only on use
        from rankwise.analysis.estimate import estimate

        return estimate
    raise AttributeError(name)
