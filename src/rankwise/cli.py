"""The command line: a thin shell over the Python API.

Flags are generated from the dataclasses in :mod:`rankwise.config` (so ``--help``,
YAML keys and keyword arguments cannot drift apart). Precedence: defaults < YAML
(``--config``) < flags. Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from rankwise.config import GROUPS, EstimateConfig, ModelConfig, Options, flag
from rankwise.errors import ConfigError
from rankwise.report.export import TOOLS

__all__ = ["main", "build_parser"]

EPILOG = """\
Why the default alpha policy is 'fixed' (lora_alpha=16 for every rank, PEFT scale alpha/r):
under Adam, letting alpha grow with the rank (the common alpha=2r) makes a higher rank act
like a larger learning rate, so in a fixed step budget it looks better even where its
capacity is not needed; with a fixed alpha the best learning rate is about the same for
every rank ("LoRA Without Regret", 2025), so the comparison measures capacity. Measured on
SmolLM2-135M (stdlib docstrings, 60 steps, lr 2e-4, all-linear): alpha=2r gave best val loss
3.33/3.20/3.09/3.03 at r=1/4/16/64 (no plateau); alpha=16 gave 3.144/3.144/3.146/3.148 (flat).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _arg_type(hint):
    """argparse type for a field's annotation; lists are comma-separated strings."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args and typing.get_origin(hint) in (typing.Union, type(int | None)) else hint
    if typing.get_origin(base) is list:
        return str
    return base if base in (int, float, str) else str


def _switchable(hint) -> bool:
    """An option that takes a value or ``false`` (``str | bool | None``): ``--X V``/``--no-X``."""
    args = typing.get_args(hint)
    return hint is not bool and bool in args and str in args


def _add_group_flags(parser: argparse.ArgumentParser, groups=GROUPS) -> None:
    for gname, klass in groups.items():
        group = parser.add_argument_group(gname)
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            # argparse %-formats help strings: a literal % must be doubled
            help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
            if hints[f.name] is bool:
                group.add_argument(
                    flag(f.name),
                    dest=f.name,
                    default=None,
                    action=argparse.BooleanOptionalAction,
                    help=help_text,
                )
            else:
                # --from is also --recipe, the option's name in YAML and keyword arguments
                alias = ["--" + f.name.replace("_", "-")] if flag(f.name) != "--" + f.name else []
                group.add_argument(
                    flag(f.name),
                    *alias,
                    dest=f.name,
                    default=None,
                    type=_arg_type(hints[f.name]),
                    help=help_text,
                    metavar=f.name.upper(),
                    choices=f.metadata.get("choices"),
                )
            if _switchable(hints[f.name]):  # a value, or --no-NAME to turn it off
                group.add_argument(
                    "--no-" + flag(f.name)[2:], dest=f"no_{f.name}", action="store_true",
                    help=f"Turn {flag(f.name)} off.",
                )  # fmt: skip


def load_yaml(path: str) -> dict:
    """Flat option keys from a YAML file (group sections like ``lora:`` are flattened)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"--config: {path}{where}: malformed YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path}: expected a mapping of option: value")
    flat = {}
    for key, value in data.items():
        if key in GROUPS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def options_from_args(ns: argparse.Namespace, groups=GROUPS) -> dict:
    values = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    index = Options.field_index()
    unknown = [k for k in values if k.replace("-", "_") not in index]
    if unknown:
        raise ConfigError(f"--config: {ns.config}: unknown option {unknown[0]!r}")
    for gname in groups:
        for f in dataclasses.fields(GROUPS[gname]):
            if getattr(ns, f.name, None) is not None:
                values[f.name] = getattr(ns, f.name)
            if getattr(ns, f"no_{f.name}", False):
                if getattr(ns, f.name, None) is not None:
                    raise ConfigError(
                        f"{flag(f.name)}: cannot be combined with --no-{flag(f.name)[2:]}"
                    )
                values[f.name] = False
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rankwise", description="Choose the LoRA rank for a model and data.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser(
        "search",
        help="run a rank search",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of options (flat keys as the flags, with _)")
    _add_group_flags(p)
    p = sub.add_parser(
        "estimate", help="predict parameters, adapter size, memory (and time) per rank"
    )
    _add_group_flags(p, {"estimate": EstimateConfig})
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("show", help="print a run's trial table and recommendation")
    p.add_argument("dir")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("report", help="write DIR/report.html (and summary.md)")
    p.add_argument("dir")
    p.add_argument("--open", action="store_true", help="open it in a browser")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser(
        "inspect",
        help="effective rank of every module of a LoRA adapter, and a per-module rank_pattern",
    )
    p.add_argument("dir", help="a PEFT LoRA adapter folder (adapter_config.json + safetensors)")
    p.add_argument(
        "--energy",
        type=float,
        default=0.9,
        help="share of each module's update energy the proposed rank_pattern keeps (default: 0.9)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--figure", metavar="PATH", help="save a heat map of the effective ranks")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser(
        "export",
        help="write the recommended LoRA settings as an axolotl, LLaMA-Factory or PEFT config",
    )
    p.add_argument("dir", help="a finished run directory (holding recommendation.json)")
    p.add_argument(
        "--to",
        required=True,
        choices=TOOLS,
        help="axolotl, llama-factory or trl: YAML keys to merge into that tool's config; "
        "peft: LoraConfig keyword arguments as JSON",
    )
    p.add_argument(
        "--merge-into",
        metavar="FILE",
        help="write the answer into this training config of the --to tool, keeping every "
        "other key, the order and the comments (to --output, default FILE.rankwise.yml)",
    )
    p.add_argument("--in-place", action="store_true", help="--merge-into: rewrite FILE itself")
    p.add_argument("--output", help="file to write (default: standard output)")
    p.add_argument("--debug", action="store_true")
    return parser


def _cmd_search(ns) -> int:
    from rankwise.io.recipes import with_recipe
    from rankwise.study.study import Study

    Study(Options.from_flat(with_recipe(options_from_args(ns)), "--config")).run()
    return 0


def _cmd_show(ns) -> int:
    from rankwise.report.summary import summary_markdown

    print(summary_markdown(ns.dir))
    return 0


def _cmd_report(ns) -> int:
    from rankwise.report.html import write_report
    from rankwise.report.summary import write_summary

    write_summary(ns.dir)
    path = write_report(ns.dir)
    print(path)
    if ns.open:
        import webbrowser

        webbrowser.open(path.absolute().as_uri())
    return 0


def _cmd_inspect(ns) -> int:
    import json

    from rankwise.analysis import spectra
    from rankwise.report.plots import write_heatmap

    result = spectra.inspect_adapter(ns.dir, energy=ns.energy)
    if ns.figure:
        write_heatmap(result, ns.figure)
    print(json.dumps(result.to_dict()) if ns.json else spectra.format_inspection(result))
    return 0


def _cmd_export(ns) -> int:
    from rankwise.report.export import export
    from rankwise.report.merge import merge_into

    if ns.merge_into:
        merged = merge_into(ns.dir, ns.to, ns.merge_into, ns.output, ns.in_place)
        print(merged.path)
        for note in merged.notes:
            print(f"rankwise export: {note}", file=sys.stderr)
        return 0
    if ns.in_place:
        raise ConfigError("--in-place: needs --merge-into FILE")
    result = export(ns.dir, ns.to)
    if ns.output:
        try:
            Path(ns.output).write_text(result.text)
        except OSError as exc:
            raise ConfigError(f"--output: cannot write {ns.output} ({exc.strerror})") from None
        print(ns.output)
    else:
        print(result.text, end="")
    for note in result.notes:
        print(f"rankwise export: not applied: {note}", file=sys.stderr)
    return 0


def _cmd_estimate(ns) -> int:
    import json

    import peft  # noqa: F401  (loaded as a search would: part of the CPU memory baseline)
    import transformers  # noqa: F401

    from rankwise.analysis.estimate import calibrate, estimate, format_table
    from rankwise.training.resources import current_rss

    fields = [f.name for f in dataclasses.fields(EstimateConfig)]
    cfg = EstimateConfig(**{k: getattr(ns, k) for k in fields if getattr(ns, k) is not None})
    kw = dict(
        ranks=cfg.ranks,
        target_modules=cfg.target_modules,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        dtype=cfg.dtype,
        bias=cfg.bias,
        device=cfg.device,
        gradient_checkpointing=cfg.gradient_checkpointing,
        trust_remote_code=cfg.trust_remote_code,
        baseline_bytes=current_rss(),
        quantize=cfg.quantize,
    )
    try:
        if cfg.calibrate:
            from rankwise.io.models import load_model

            model, _, _ = load_model(
                ModelConfig(
                    model=cfg.model,
                    device=cfg.device,
                    dtype=cfg.dtype,
                    trust_remote_code=cfg.trust_remote_code,
                    quantize=cfg.quantize,
                )
            )
            timing = calibrate(
                model,
                ranks=(cfg.ranks[0], cfg.ranks[-1]),
                target_modules=cfg.target_modules,
                batch_size=cfg.batch_size,
                seq_len=cfg.seq_len,
            )
            rows = estimate(model, timing=timing, max_steps=cfg.max_steps, **kw)
        else:
            rows = estimate(cfg.model, **kw)
    except ValueError as exc:
        raise ConfigError(
            f"--target-modules: {exc}" if "target_modules" in str(exc) else str(exc)
        ) from None
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--model: cannot load the config of {cfg.model!r} ({first})") from None
    print(json.dumps([r.to_dict() for r in rows], indent=2) if cfg.json else format_table(rows))
    return 0


COMMANDS = {
    "search": _cmd_search,
    "estimate": _cmd_estimate,
    "show": _cmd_show,
    "report": _cmd_report,
    "inspect": _cmd_inspect,
    "export": _cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return COMMANDS[ns.command](ns)
    except ConfigError as exc:
        if getattr(ns, "debug", False):
            raise
        print(f"rankwise {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "rankwise: interrupted; finished trials are saved, rerun the command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
