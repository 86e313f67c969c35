"""recommendation.json as one typed record: :class:`RecommendationDoc`.

One function writes it (:func:`rankwise.report.recommendation.build_document`, for a
finished search and for the provisional answer of a live one alike) and every view reads it
back through :func:`read_document`: ``show``, ``summary.md`` and ``report.html``
(:mod:`rankwise.report.view`), ``export`` and ``--merge-into``. The JSON Schema beside this
module (``recommendation.schema.json``, :func:`schema`) describes the file; the README's
"recommendation.json" table lists every field.

Versions: ``schema_version`` 2 is this record. A file without it is version 1 (rankwise
before the record): it still reads, its ``base_val_loss`` becomes ``base_loss`` and its
headline and evidence are rebuilt from its scores. A renamed key is written under its old
name too for one version (:data:`DEPRECATED`), and the file's ``deprecated`` says so.

Example (a version-1 file reads; the old name is still written, and marked):
    >>> doc = RecommendationDoc.from_dict({"rank": 4, "base_val_loss": 3.5, "reason": "r=4"})
    >>> doc.schema_version, doc.base_loss
    (2, 3.5)
    >>> d = doc.to_dict()
    >>> d["base_val_loss"], d["deprecated"]["base_val_loss"]
    (3.5, 'renamed base_loss; written until schema_version 3')
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from rankwise.core.criteria import Criterion, Recommendation
from rankwise.core.scores import RankScore
from rankwise.io.readers import read_json_object

__all__ = [
    "SCHEMA_VERSION",
    "DEPRECATED",
    "RecommendationDoc",
    "criterion_of",
    "read_document",
    "schema",
]

SCHEMA_VERSION = 2
SCHEMA_FILE = "recommendation.schema.json"

# Old name -> (its replacement, the note the file carries). Written alongside the new name
# until the next schema_version, then dropped.
DEPRECATED = {
    "base_val_loss": ("base_loss", "renamed base_loss; written until schema_version 3"),
    "budget.lr": (
        "learning_rate.lr",
        "the same as learning_rate.lr; written until schema_version 3",
    ),
}

# Sections only some searches have: left out of the file when empty.
OPTIONAL = (
    "metric_value",
    "best_metric_value",
    "labels",
    "serve",
    "recipe",
    "targets",
    "tuning",
    "final",
    "per_layer",
)


@dataclass(frozen=True)
class RecommendationDoc:
    """What a search recommends, why, and everything it rests on (recommendation.json)."""

    # -- the answer, in words ---------------------------------------------------------------
    schema_version: int = SCHEMA_VERSION
    """The document's layout: 2 (a file without the key is version 1)."""
    headline: str = ""
    """One sentence: the rank, why, and how sure."""
    evidence: tuple[str, ...] = ()
    """The headline's grounds, one short line each (no nested parentheses)."""
    # -- the answer, in numbers --------------------------------------------------------------
    rank: int | None = None
    """The recommended rank; None when nothing is recommended."""
    loss: float | None = None
    """Its score: the seed-adjusted mean val loss (or error ``1 - metric``)."""
    best_rank: int | None = None
    """The rank with the lowest score."""
    best_loss: float | None = None
    """That rank's score."""
    base_loss: float | None = None
    """The base model's score without an adapter, on the same validation blocks."""
    share: float | None = None
    """The recommended rank's share of the best rank's improvement over the base model."""
    lora_helps: bool | None = None
    """False: no rank beats the base model beyond the noise; None: no base score."""
    confidence: str = ""
    """How sure the answer is, in words (high, low, unmeasured, and why)."""
    undecided: str = ""
    """The comparisons the noise left open, in words ("" when none)."""
    max_regret: float | None = None
    """The guarantee (``--max-regret``): the answer is shown within this share of the best
    rank's val loss."""
    regret: float | None = None
    """How much worse than the best rank trained the answer is, as a share of its loss."""
    regret_bound: float | None = None
    """The same with the noise: the difference plus its 95% half-width (at most
    ``max_regret``)."""
    criterion_rank: int | None = None
    """The criterion's own pick, before the guarantee raised it (equal to ``rank`` when it
    did not)."""
    reason: str = ""
    """The recommendation as one long sentence (the headline and evidence say it shorter)."""
    stop_reason: str = ""
    """Why the search stopped."""
    criterion: dict = field(default_factory=dict)
    """``{kind, threshold, scale}``: when a rank counts as good as the best."""
    noise: dict | None = None
    """The curve's noise model: ``sigma``, ``df``, ``source``, ``seeds`` per rank."""
    metric: str = "loss"
    """What the scores hold: ``loss``, or ``accuracy``/``f1`` as the error ``1 - metric``."""
    metric_value: float | None = None
    """accuracy/f1: the recommended rank's metric as users read it."""
    best_metric_value: float | None = None
    """accuracy/f1: the best rank's metric."""
    labels: list | None = None
    """seq-cls: the classifier's labels, in head order."""
    # -- the adapter and how it was trained ----------------------------------------------------
    lora_config: dict | None = None
    """``peft.LoraConfig(**lora_config)`` keywords of the recommended adapter."""
    adapter_dir: str | None = None
    """The delivered adapter, relative to the run directory (None until delivered)."""
    model: str = ""
    """The base model the search trained on."""
    name: str = ""
    """The run's name."""
    task: str | None = None
    """``causal-lm`` or ``seq-cls``."""
    quantize: str | None = None
    """``none``, ``4bit`` or ``8bit``: how the base was loaded."""
    quantization_config: dict | None = None
    """``BitsAndBytesConfig(**d)`` keywords of a quantized base."""
    precision: str = ""
    """The trials' weights and autocast dtype."""
    alpha_policy: str = ""
    """How lora_alpha follows the rank."""
    strategy: str = ""
    """The search strategy (ladder, grid, nested)."""
    learning_rate: dict | None = None
    """``{lr, calibrated, ...}``: the rate the answer holds for, and its calibration."""
    budget: dict = field(default_factory=dict)
    """The trial budget the answer holds for (steps, batch, seq_len, ``holds_for``)."""
    serve: dict | None = None
    """--serve: the engine, the ``--max-lora-rank`` to start it with, the command."""
    recipe: dict | None = None
    """--from: the recipe file and its tool."""
    warnings: tuple[str, ...] = ()
    """What makes the comparison less fair than it looks (recipe keys not honoured, ...)."""
    # -- the evidence ----------------------------------------------------------------------------
    trials: tuple[dict, ...] = ()
    """Every trial of the curve: rank, seed, status, best val loss, costs."""
    scores: tuple[dict, ...] = ()
    """Per rank: ``mean`` (seed-adjusted), ``se``, ``n`` seeds, status, share, forgetting."""
    forgetting: dict | None = None
    """What each rank costs the base model on the retain set (None: not measured)."""
    diagnosis: dict | None = None
    """Advice on the training budget, and how many trials had each diagnosis."""
    races: tuple[dict, ...] = ()
    """Comparisons raced with more seeds (or not raced, and why)."""
    stopped_early: tuple[dict, ...] = ()
    """Trials --stop-when-decided stopped, with the evidence and tokens saved."""
    answer_by_step: tuple[dict, ...] = ()
    """The recommendation recomputed at every evaluation step."""
    answer_moved: str = ""
    """A warning when the answer still moved late in training ("" when not)."""
    branches: tuple[dict, ...] = ()
    """--branch-at: each branched trial of the curve (key, rank, seed), its trunk
    (``trunk``, ``trunk_rank``), the ``step`` it starts after and ``how`` (grown, shrunk)."""
    targets: dict | None = None
    """--compare-targets: each target set's rows and the verdict."""
    tuning: dict | None = None
    """--tune: the co-tuned variants and the verdict."""
    final: dict | None = None
    """nested: the ordinary trial at the chosen rank."""
    per_layer: dict | None = None
    """--per-layer: the rank patterns tried and the verdict."""
    extra: dict = field(default_factory=dict, compare=False)
    """Keys this version does not know (a newer writer's), kept as read."""

    # -- reading and writing ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecommendationDoc:
        """The record of a recommendation.json of any version (1: without schema_version)."""
        d = dict(d)
        d.pop("deprecated", None)
        version = d.pop("schema_version", 1)
        old_base = d.pop("base_val_loss", None)
        if d.get("base_loss") is None:
            d["base_loss"] = old_base
        if isinstance(d.get("budget"), dict):
            d["budget"] = {k: v for k, v in d["budget"].items() if k != "lr"}
        if not isinstance(d.get("criterion"), dict):  # v1 before the dict: "knee 0.01 of ..."
            words = str(d.get("criterion") or "").split()
            d["criterion"] = {"kind": words[0], "threshold": float(words[1])} if words else {}
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        known = {
            k: tuple(v) if fields[k].default == () and isinstance(v, list) else v
            for k, v in d.items()
            if k in fields and v is not None
        }
        extra = {k: v for k, v in d.items() if k not in fields}
        known["schema_version"] = max(int(version), SCHEMA_VERSION)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: every field (the optional sections when set), the unknown keys
        as read, and the deprecated names with their notes."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (f.name in OPTIONAL and value is None):
                continue
            out[f.name] = _plain(value)
        out |= _plain(self.extra)
        out["base_val_loss"] = self.base_loss
        if isinstance(self.learning_rate, dict) and "lr" in self.learning_rate:
            out["budget"] = {**out["budget"], "lr": self.learning_rate["lr"]}
        out["deprecated"] = {old: note for old, (_, note) in DEPRECATED.items()}
        return out

    # -- what the views need -------------------------------------------------------------------
    @property
    def base_val_loss(self) -> float | None:
        """Deprecated: :attr:`base_loss`."""
        warnings.warn(
            "RecommendationDoc.base_val_loss is deprecated; use base_loss",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.base_loss

    def recommendation(self) -> Recommendation:
        """The search core's record of the answer (the fields both have)."""
        have = {f.name for f in dataclasses.fields(Recommendation)}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values |= self.extra
        kw = {k: v for k, v in values.items() if k in have and k != "criterion"}
        kw.setdefault("stop_reason", "")
        return Recommendation(**{"reason": "", **kw})

    def rank_scores(self) -> list[RankScore]:
        """The per-rank scores as the file holds them (no noise model: unpaired SEs)."""
        return [
            RankScore(
                int(s["rank"]),
                s.get("mean"),
                float(s.get("se") or 0.0),
                int(s.get("n") or 0),
                str(s.get("status", "")),
                str(s.get("reason") or ""),
            )
            for s in self.scores
        ]

    def run_criterion(self, options: dict | None = None) -> Criterion:
        """The run's :class:`Criterion`, its scale included; ``options`` (the stored flat
        options) fill in what an old file lacks."""
        return criterion_of(options or {}, self.criterion)


def criterion_of(options: dict[str, Any], recorded: dict | None = None) -> Criterion:
    """The :class:`Criterion` of a run: as a document ``recorded`` it, else as its flat
    options name it (``--criterion``, ``--threshold``, ``--criterion-scale``; the
    ``--max-regret`` guarantee where the options have one)."""
    c, o = recorded or {}, options
    regret = o.get("max_regret")
    return Criterion(
        c.get("kind") or o.get("criterion") or "knee",
        c.get("threshold", o.get("threshold")),
        c.get("scale") or o.get("criterion_scale"),
        **({"max_regret": regret} if regret is not None else {}),
    )


def _plain(value: Any) -> Any:
    """JSON-ready: tuples as lists, all the way down."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def read_document(path: str | Path, flag: str = "show") -> RecommendationDoc:
    """Read a recommendation.json (any version) into the record; a file that is not a JSON
    object is a one-line ConfigError naming ``flag`` and the file."""
    return RecommendationDoc.from_dict(read_json_object(Path(path), flag))


@cache
def schema() -> dict:
    """The JSON Schema of recommendation.json, as shipped in the package."""
    text = resources.files("rankwise.report").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)
