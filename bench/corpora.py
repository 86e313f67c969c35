"""Real text corpora available offline, for runs beside the built-in 'stdlib-docstrings'.

``package-readmes``: the long descriptions (the README a package publishes on PyPI, stored
as the payload or ``Description`` field of its installed metadata, read with
``importlib.metadata``) of the distributions that ``requirements/dev.txt`` names, as
installed in the running interpreter's environment. No one in this project wrote them, and
they are English prose about software, unlike the standard library's docstrings.

Each description is cut into paragraphs (blank lines), markup that is not prose is dropped
(fenced or indented code blocks, reST directives and substitutions, HTML, badge and image
lines, tables, heading underlines, link targets; Markdown links keep their text), and
consecutive paragraphs are joined into chunks of at most 1,500 characters; chunks under 200
characters or less than 60% letters and spaces are dropped. Records interleave the packages
(chunk 1 of each package in requirement order, then chunk 2, ...), so the first
``max_records`` cover every package.

The file is a pure function of the installed versions, which the manifest next to it
records (``package-readmes.json``: versions, counts, sha256): with the same environment
every run writes the same bytes. Only ``torch``, ``ray`` and ``bitsandbytes`` are pinned
exactly in dev.txt; the others are lower bounds, so another environment can give other
text.

Usage::

    python -m bench.corpora                     # bench/.cache/corpora/package-readmes.jsonl
    python -m bench.corpora --max-records 500   # ...-n500.jsonl
    rankwise search --model smollm2 --train bench/.cache/corpora/package-readmes.jsonl ...
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import json
import re
from itertools import zip_longest
from pathlib import Path

__all__ = ["package_readmes", "readme_chunks", "requirement_names", "main"]

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "corpora"
REQUIREMENTS = ROOT.parent / "requirements" / "dev.txt"
MIN_CHARS, MAX_CHARS = 200, 1500  # chunk size: a few sentences to a few paragraphs
MIN_PROSE = 0.6  # share of letters and whitespace below which a chunk is code or markup
VERSION = 1  # bump when the chunking changes

_SKIP_START = ("..", "<", "|", "[![", "![", "```", "~~~", "+--", "+==", ">>>", "$ ")
_LINK_TARGET = re.compile(r"^\s*(\[[^\]]+\]:|\.\. _)")
_UNDERLINE = re.compile(r"^\s*([=\-~^*#+`'\"])\1{2,}\s*$")
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")


def requirement_names(path: Path = REQUIREMENTS) -> list[str]:
    """The distribution names a requirements file lists, in its order.

    >>> import tempfile; f = Path(tempfile.mkdtemp()) / "r.txt"
    >>> _ = f.write_text("# c\\ntorch==2.1  # cpu\\npyyaml>=6\\nray[default]==2.6\\n")
    >>> requirement_names(f)
    ['torch', 'pyyaml', 'ray']
    """
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[\s\[<>=!~;@]", line, maxsplit=1)[0])
    return names


def _description(dist: metadata.Distribution) -> str:
    """The long description: the metadata payload, or the (older) Description field."""
    meta = dist.metadata
    text = meta.get_payload() or meta.get("Description") or ""
    if "\n        |" in text:  # Metadata 1.x folds the field's lines as "        |line"
        text = re.sub(r"\n {8}\|", "\n", text)
    return text.replace("\r\n", "\n")


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a Markdown or reST document (see the module docstring)."""
    text = re.sub(r"(?ms)^(```|~~~).*?^\1[^\n]*$", "", text)  # fenced code blocks
    text = re.sub(r"(?s)<!--.*?-->", "", text)
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if not _UNDERLINE.match(ln)]
        lines = [ln for ln in lines if not _LINK_TARGET.match(ln)]
        if not lines or all(ln.startswith(("    ", "\t")) for ln in lines):
            continue  # indented: a code block, or a directive's body
        if lines[0].lstrip().startswith(_SKIP_START):
            continue
        para = _MD_LINK.sub(r"\1", "\n".join(ln.rstrip() for ln in lines)).strip()
        if para:
            out.append(para)
    return out


def _prose(text: str) -> bool:
    return sum(c.isalpha() or c.isspace() for c in text) >= MIN_PROSE * len(text)


def readme_chunks(text: str, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> list[str]:
    """Chunks of ``min_chars``..``max_chars`` characters: consecutive prose paragraphs joined
    by blank lines (a longer paragraph is cut at line ends).

    >>> readme_chunks("# Title\\n\\n" + "Some words here. " * 20, min_chars=100)[0][:25]
    '# Title\\n\\nSome words here.'
    """
    pieces = []
    for para in _paragraphs(text):
        while len(para) > max_chars:
            cut = para.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else para.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(para[:cut].strip())
            para = para[cut:].strip()
        pieces.append(para)
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
    chunks.append(current)
    return [c for c in chunks if len(c) >= min_chars and _prose(c)]


def _collect(names: list[str]) -> tuple[dict[str, list[str]], dict]:
    """Chunks per installed package, and the manifest's per-package entries."""
    chunks, packages = {}, {}
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            packages[name] = {"version": None, "records": 0, "chars": 0}
            continue
        chunks[name] = readme_chunks(_description(dist))
        packages[name] = {
            "version": dist.version,
            "records": len(chunks[name]),
            "chars": sum(map(len, chunks[name])),
        }
    return chunks, packages


def package_readmes(path: str | Path | None = None, max_records: int | None = None) -> Path:
    """Write the ``package-readmes`` corpus as JSON Lines ``{"text": ...}``; return its path.

    ``path`` defaults to ``bench/.cache/corpora/package-readmes.jsonl`` (``-n{max_records}``
    before the suffix when ``max_records`` is given); a manifest ``.json`` is written beside
    it. The file is rewritten only when its bytes would change. Example::

        >>> path = package_readmes("/tmp/readmes.jsonl", max_records=50)  # doctest: +SKIP
        >>> rankwise.search(model="smollm2", train=str(path), ...)  # doctest: +SKIP
    """
    if max_records is not None and max_records < 1:
        raise ValueError(f"--max-records: must be >= 1, got {max_records}")
    name = "package-readmes" + (f"-n{max_records}" if max_records else "")
    path = Path(path) if path is not None else CACHE / f"{name}.jsonl"
    chunks, packages = _collect(requirement_names())
    texts = [t for row in zip_longest(*chunks.values()) for t in row if t is not None]
    texts = texts[:max_records]
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    manifest = {
        "corpus": "package-readmes",
        "version": VERSION,
        "source": "importlib.metadata long descriptions of the distributions named in "
        "requirements/dev.txt, as installed",
        "chunk_chars": [MIN_CHARS, MAX_CHARS],
        "max_records": max_records,
        "records": len(texts),
        "chars": sum(map(len, texts)),
        "sha256": hashlib.sha256(data).hexdigest(),
        "packages": packages,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    path.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="the .jsonl file to write")
    parser.add_argument("--max-records", type=int, default=None, help="keep the first N")
    args = parser.parse_args(argv)
    path = package_readmes(args.out, args.max_records)
    manifest = json.loads(path.with_suffix(".json").read_text())
    missing = [n for n, p in manifest["packages"].items() if p["version"] is None]
    print(
        f"package-readmes: {manifest['records']:,} records, {manifest['chars']:,} characters "
        f"from {len(manifest['packages']) - len(missing)} packages"
        + (f" (not installed: {', '.join(missing)})" if missing else "")
        + f" -> {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
