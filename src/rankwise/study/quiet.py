"""Third-party warnings that tell a user nothing they can act on, kept out of the terminal
while a search runs (``--debug`` keeps them).

Each is named by its category and the start of its message, so every other warning of
the same libraries still reaches the user, and only for the search: the filters are undone
when it ends (:func:`warnings.catch_warnings`).

Example:
    >>> import warnings
    >>> def forward():
    ...     warnings.warn("`past_key_values` is deprecated and will be removed", FutureWarning)
    ...     warnings.warn("something the user should see", UserWarning)
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     with third_party_quiet(debug=False):
    ...         forward()
    >>> [str(w.message) for w in seen]
    ['something the user should see']
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     with third_party_quiet(debug=True):
    ...         forward()
    >>> len(seen)
    2
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = ["NOISE", "third_party_quiet"]

# (category, a regex the message starts with): why the user cannot act on it.
NOISE = (
    # transformers 5.x, from every LlamaForCausalLM.forward: its own keyword being renamed
    # to `cache`; rankwise passes neither, the model's generate-time plumbing does.
    (FutureWarning, r"`?past_key_values`? is deprecated"),
    # PEFT on GPT-2-style Conv1D modules: it sets fan_in_fan_out itself and says so.
    (UserWarning, r"fan_in_fan_out is set to"),
)


@contextlib.contextmanager
def third_party_quiet(debug: bool = False) -> Iterator[None]:
    """Hide :data:`NOISE` inside the block, unless ``debug``."""
    with warnings.catch_warnings():
        if not debug:
            for category, message in NOISE:
                warnings.filterwarnings("ignore", message=message, category=category)
        yield
