"""rankwise: choose the LoRA rank for a model and data, with the evidence.

Importing it has no side effects: it imports neither torch nor PEFT, and installs nothing
in the import system (PEFT is imported where a search first needs it:
``rankwise.io.quantize.import_peft``). No public name hides a submodule.

>>> import rankwise
>>> sorted(rankwise.__all__)
['Options', 'SearchResult', 'estimate', 'search']
"""

from rankwise.config import Options
from rankwise.study.study import SearchResult, search

__all__ = ["search", "SearchResult", "Options", "estimate"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "estimate":  # imports torch and transformers: only on use
        from rankwise.analysis.estimate import estimate

        return estimate
    raise AttributeError(f"module 'rankwise' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"estimate"})
