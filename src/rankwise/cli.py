"""The command line: a thin shell over the Python API.

Every command's arguments are generated from the dataclasses in :mod:`rankwise.config`
(:data:`COMMANDS` names each command's), so ``--help``, YAML keys and keyword arguments
cannot drift apart. ``rankwise search --help`` shows the options marked everyday,
``--help-all`` all of them. Precedence: defaults < YAML (``--config``) < flags. Bad input
exits with status 2 and one line on stderr; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

from rankwise.config import (
    GROUPS,
    EstimateConfig,
    ExportConfig,
    InspectConfig,
    ModelConfig,
    Options,
    ReportConfig,
    RunConfig,
    ShowConfig,
    flag,
)
from rankwise.errors import ConfigError

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


def _groups(options: type) -> dict[str | None, type]:
    """The argument groups of a command: a search's are :data:`GROUPS`, the others have one
    dataclass each (:mod:`rankwise.config.commands`), shown without a heading."""
    return GROUPS if options is Options else {None: options}


def _declared(klass: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(klass) if f.name == name)


# One --debug for every command: the search's own option (RunConfig.debug).
DEBUG = _declared(RunConfig, "debug")


def _add_option(group, f: dataclasses.Field, hint, summary: bool = False) -> None:
    """One declared option as an argument: its flag, type, choices and help (or, for the
    short ``--help``, its everyday summary)."""
    meta = f.metadata
    help_text = meta["everyday"] if summary else meta.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, list):  # as it is typed: comma-separated
        default = ",".join(map(str, default))
    if not (meta.get("positional") or meta.get("required") or (summary and default is None)):
        help_text += f" (default: {default})"
    help_text = help_text.replace("%", "%%")  # argparse %-formats help strings
    if meta.get("positional"):
        group.add_argument(f.name, help=help_text)
    elif hint is bool:
        group.add_argument(
            flag(f.name),
            dest=f.name,
            default=None,
            action=argparse.BooleanOptionalAction,
            help=help_text,
        )
    else:
        # --from is also --recipe, the option's name in YAML and keyword arguments
        name = "--" + f.name.replace("_", "-")
        alias = [name] if flag(f.name) != name else []
        group.add_argument(
            flag(f.name),
            *alias,
            dest=f.name,
            default=None,
            type=_arg_type(hint),
            help=help_text,
            metavar=meta.get("metavar") or (None if meta.get("choices") else f.name.upper()),
            choices=meta.get("choices"),
            required=meta.get("required", False),
        )
    if _switchable(hint):  # a value, or --no-NAME to turn it off
        group.add_argument(
            "--no-" + flag(f.name)[2:], dest=f"no_{f.name}", action="store_true",
            help=f"Turn {flag(f.name)} off.",
        )  # fmt: skip


def _add_options(parser: argparse.ArgumentParser, options: type, everyday: bool = False) -> None:
    """Every option ``options`` declares (or only its everyday ones, summarised), and --debug."""
    for title, klass in _groups(options).items():
        fields = [
            f for f in dataclasses.fields(klass) if f.metadata.get("everyday") or not everyday
        ]
        if not fields:
            continue
        group = parser.add_argument_group(title) if title else parser
        hints = typing.get_type_hints(klass)
        for f in fields:
            _add_option(group, f, hints[f.name], summary=everyday)
    if options is not Options:  # a search declares it in its run group
        _add_option(parser, DEBUG, bool)


# --- rankwise search: --help shows the everyday options, --help-all every one -------------
SEARCH_USAGE = "%(prog)s [--model MODEL] [--train TRAIN] [OPTION ...]"
CONFIG_HELP = "YAML file of options (flat keys as the flags, with _)"


def search_option_count() -> int:
    """Every option of a search: the declared ones and --config."""
    return sum(len(dataclasses.fields(klass)) for klass in GROUPS.values()) + 1


class _PrintHelp(argparse.Action):
    """``-h``/``--help-all``: print a help text (built when asked for) and exit."""

    def __init__(self, option_strings, dest, text, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self.text = text

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(self.text(parser))
        parser.exit(0)


def _add_search_arguments(parser: argparse.ArgumentParser, everyday_only: bool) -> None:
    n = search_option_count()
    parser.add_argument(
        "-h", "--help", action=_PrintHelp, text=lambda p: _everyday_parser().format_help(),
        help="show the everyday options and exit",
    )  # fmt: skip
    parser.add_argument(
        "--help-all", action=_PrintHelp, text=lambda p: p.format_help(),
        help=f"show all {n} options, grouped, and exit",
    )  # fmt: skip
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    _add_options(parser, Options, everyday=everyday_only)


def _search_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """``rankwise search`` with every option (what parses, and ``--help-all``)."""
    parser = parser or _Parser(prog="rankwise search", add_help=False)
    parser.usage, parser.epilog = SEARCH_USAGE, EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_search_arguments(parser, everyday_only=False)
    return parser


def _everyday_parser() -> argparse.ArgumentParser:
    """The same, with only the everyday options: what ``--help`` prints."""
    parser = _Parser(
        prog="rankwise search",
        usage=SEARCH_USAGE,
        add_help=False,
        epilog=f"rankwise search --help-all shows all {search_option_count()} options.",
    )
    _add_search_arguments(parser, everyday_only=True)
    return parser


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


def options_from_args(ns: argparse.Namespace, options: type = Options) -> dict:
    """The values given (the --config file's, then the flags'), by option name."""
    values = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    index = Options.field_index()
    unknown = [k for k in values if k.replace("-", "_") not in index]
    if unknown:
        raise ConfigError(f"--config: {ns.config}: unknown option {unknown[0]!r}")
    for klass in _groups(options).values():
        for f in dataclasses.fields(klass):
            if getattr(ns, f.name, None) is not None:
                values[f.name] = getattr(ns, f.name)
            if getattr(ns, f"no_{f.name}", False):
                if getattr(ns, f.name, None) is not None:
                    raise ConfigError(
                        f"{flag(f.name)}: cannot be combined with --no-{flag(f.name)[2:]}"
                    )
                values[f.name] = False
    return values


def config_from_args(ns: argparse.Namespace, options: type):
    """The typed options of a command: :class:`Options` (over a --from recipe) for a search,
    else the command's dataclass."""
    values = options_from_args(ns, options)
    if options is not Options:
        return options(**values)
    from rankwise.io.recipes import with_recipe

    return Options.from_flat(with_recipe(values), "--config")


def _cmd_search(opts: Options) -> int:
    from rankwise.study.study import Study

    Study(opts).run()
    return 0


def _cmd_show(cfg: ShowConfig) -> int:
    from rankwise.report.summary import summary_markdown

    print(summary_markdown(cfg.dir))
    return 0


def _cmd_report(cfg: ReportConfig) -> int:
    from rankwise.report.html import write_report
    from rankwise.report.summary import write_summary

    write_summary(cfg.dir)
    path = write_report(cfg.dir)
    print(path)
    if cfg.open:
        import webbrowser

        webbrowser.open(path.absolute().as_uri())
    return 0


def _cmd_inspect(cfg: InspectConfig) -> int:
    import json

    from rankwise.analysis import spectra
    from rankwise.report.plots import write_heatmap

    result = spectra.inspect_adapter(cfg.dir, energy=cfg.energy)
    if cfg.figure:
        write_heatmap(result, cfg.figure)
    print(json.dumps(result.to_dict()) if cfg.json else spectra.format_inspection(result))
    return 0


def _cmd_export(cfg: ExportConfig) -> int:
    from rankwise.report.export import export
    from rankwise.report.merge import merge_into

    if cfg.merge_into:
        merged = merge_into(cfg.dir, cfg.to, cfg.merge_into, cfg.output, cfg.in_place)
        print(merged.path)
        for note in merged.notes:
            print(f"rankwise export: {note}", file=sys.stderr)
        return 0
    result = export(cfg.dir, cfg.to)
    if cfg.output:
        try:
            Path(cfg.output).write_text(result.text)
        except OSError as exc:
            raise ConfigError(f"--output: cannot write {cfg.output} ({exc.strerror})") from None
        print(cfg.output)
    else:
        print(result.text, end="")
    for note in result.notes:
        print(f"rankwise export: not applied: {note}", file=sys.stderr)
    return 0


def _cmd_estimate(cfg: EstimateConfig) -> int:
    import json

    import transformers  # noqa: F401  (loaded as a search would: part of the CPU memory baseline)

    from rankwise.analysis.estimate import calibrate, estimate, format_table
    from rankwise.io.quantize import import_peft
    from rankwise.training.resources import current_rss

    import_peft()
    kw = dict(
        ranks=cfg.ranks,
        target_modules=cfg.target_modules,
        target_parameters=cfg.target_parameters,
        use_dora=cfg.use_dora,
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
                target_parameters=cfg.target_parameters,
                use_dora=cfg.use_dora,
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


@dataclass(frozen=True)
class Command:
    """A subcommand: what it does, the dataclass declaring its options, and what runs it."""

    help: str
    options: type  # Options (a search's groups) or one of rankwise.config.commands
    run: typing.Callable[[typing.Any], int]


COMMANDS = {
    "search": Command("run a rank search", Options, _cmd_search),
    "estimate": Command(
        "predict parameters, adapter size, memory (and time) per rank",
        EstimateConfig,
        _cmd_estimate,
    ),
    "show": Command("print a run's trial table and recommendation", ShowConfig, _cmd_show),
    "report": Command("write DIR/report.html (and summary.md)", ReportConfig, _cmd_report),
    "inspect": Command(
        "effective rank of every module of a LoRA adapter, and a per-module rank_pattern",
        InspectConfig,
        _cmd_inspect,
    ),
    "export": Command(
        "write the recommended LoRA settings as an axolotl, LLaMA-Factory or PEFT config",
        ExportConfig,
        _cmd_export,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rankwise", description="Choose the LoRA rank for a model and data.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        if command.options is Options:
            _search_parser(sub.add_parser(name, help=command.help, add_help=False))
        else:
            _add_options(sub.add_parser(name, help=command.help), command.options)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    command = COMMANDS[ns.command]
    try:
        return command.run(config_from_args(ns, command.options))
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
