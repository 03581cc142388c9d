"""Every code block of README.md and docs/*.md runs, so the documentation cannot drift from the code.

- ```python blocks run in order, one fresh namespace per file (a later block may use an earlier one's
  names), from the repository root;
- ```bash blocks: every ``rnnkit ...`` command (also ``python -m rnnkit``, ``torchrun ... -m rnnkit``)
  is parsed by the CLI's own parser, without running it, after the block's ``NAME=value``
  assignments are substituted;
- every other fence says what it is (```text for output and tables); an untagged fence fails;
- the README's layer table lists exactly the registered layers, each with its registered modes;
- each package imports only the packages that docs/design.md's layout table allows (its floor).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import rnnkit
from rnnkit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
LANGUAGES = ("python", "bash", "text")


def fenced_blocks(path: Path) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every fenced block in ``path``, in order."""
    text = path.read_text()
    return [(m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


@pytest.mark.parametrize("path", DOC_FILES, ids=_ids(DOC_FILES))
def test_every_fence_names_its_language(path: Path) -> None:
    bad = [f"line {line}: ```{lang}" for lang, _, line in fenced_blocks(path) if lang not in LANGUAGES]
    assert not bad, f"{path.name}: fences must be one of {LANGUAGES}: {bad}"


PYTHON_FILES = [p for p in DOC_FILES if any(lang == "python" for lang, _, _ in fenced_blocks(p))]


@pytest.mark.parametrize("path", PYTHON_FILES, ids=_ids(PYTHON_FILES))
def test_python_blocks_run(path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__doc_example__"}
    for lang, code, line in fenced_blocks(path):
        if lang != "python":
            continue
        try:
            exec(compile(code, f"{path.name}:{line}", "exec"), namespace)  # noqa: S102 - the docs' own examples
        except Exception as err:
            raise AssertionError(f"{path.name}, python block at line {line} raised {type(err).__name__}: {err}") from err


def rnnkit_commands(code: str) -> list[list[str]]:
    """The argument lists after ``rnnkit`` of every command in a bash block."""
    code = code.replace("\\\n", " ")
    variables: dict[str, str] = {}
    commands = []
    for raw in code.splitlines():
        words = shlex.split(raw, comments=True)
        if len(words) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            name, value = words[0].split("=", 1)
            variables[name] = value
            continue
        line = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m.group(1), m.group(0)), raw)
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            if word == "rnnkit" or word.endswith("/rnnkit"):
                commands.append(words[i + 1 :])
                break
            if word == "-m" and i + 1 < len(words) and words[i + 1] == "rnnkit":
                commands.append(words[i + 2 :])
                break
    return commands


BASH_CASES = [
    pytest.param(argv, id=f"{path.name}:{line}:{' '.join(argv[:2]) or 'bare'}")
    for path in DOC_FILES
    for lang, code, line in fenced_blocks(path)
    if lang == "bash"
    for argv in rnnkit_commands(code)
]


@pytest.mark.parametrize("argv", BASH_CASES)
def test_cli_commands_parse(argv: list[str]) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        raise AssertionError(f"`rnnkit {' '.join(argv)}` does not parse (exit {exit_.code})") from None


def test_rnnkit_commands_finds_commands() -> None:
    """The extractor sees through continuations, comments, variables and ``python -m``."""
    code = 'T=mqar:seq_len=32\nF="--steps 5 --seeds 1"\nrnnkit bench tasks --tasks $T \\\n  $F   # note\n' \
           "python -m rnnkit list\necho rnnkit-free line\n"
    assert rnnkit_commands(code) == [["bench", "tasks", "--tasks", "mqar:seq_len=32", "--steps", "5", "--seeds", "1"],
                                     ["list"]]
    with pytest.raises(AssertionError, match="does not parse"):
        test_cli_commands_parse(["train", "--no-such-flag"])


WRAPPED = ("those of the wrapped layer",)


def readme_layer_column(column: str) -> dict[str, str]:
    """``name -> cell`` of one column of the README's table of layers (the rows whose first cell is a `name`)."""
    text = (ROOT / "README.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| layer |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == len(columns):
            rows[cells[0].strip("`")] = cells[columns.index(column)]
    return rows


def readme_layer_table() -> dict[str, tuple[str, ...]]:
    """``name -> modes`` from the README's table of layers."""
    return {name: tuple(m.strip() for m in cell.split(",")) for name, cell in readme_layer_column("modes").items()}


def test_readme_layer_table_matches_the_registry() -> None:
    """Wrappers (``delegates_auto``) offer the modes of the layer they wrap, which the table says."""
    table = readme_layer_table()
    assert sorted(table) == rnnkit.layers.names()
    expected = {n: WRAPPED if rnnkit.layers.spec(n).cls.delegates_auto else rnnkit.layers.spec(n).modes for n in table}
    wrong = {n: (m, expected[n]) for n, m in table.items() if m != expected[n]}
    assert not wrong, f"README modes differ from the registry (README, registry): {wrong}"


def design_floors() -> dict[str, set[str] | None]:
    """``package -> the rnnkit packages it may import`` from docs/design.md's layout table (None: any)."""
    floors: dict[str, set[str] | None] = {}
    text = (ROOT / "docs" / "design.md").read_text()
    section = text[text.index("## Layout of `src/rnnkit`"):]
    section = section[: section.index("\n## ", 1)]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        package = cells[0].strip("`").removesuffix("/").removesuffix(".py")
        allowed = cells[2]
        floors[package] = None if "all of the above" in allowed else set(re.findall(r"`(\w+)`", allowed))
    return floors


def rnnkit_imports(path: Path) -> set[str]:
    """The rnnkit packages/modules (first component below ``rnnkit``) that a source file imports."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "rnnkit":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from rnnkit import layers / __version__
                found.update(a.name for a in node.names if not a.name.startswith("__"))
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("rnnkit."))
    return found


def test_packages_import_only_their_floors() -> None:
    """The layout table of docs/design.md is the import rule: each package imports only what it lists."""
    floors = design_floors()
    assert {"errors", "ops", "layers", "models", "tasks", "train", "bench", "cli"} <= set(floors)
    src = ROOT / "src" / "rnnkit"
    broken = []
    for package, allowed in floors.items():
        if allowed is None:
            continue
        files = sorted((src / package).rglob("*.py")) if (src / package).is_dir() else [src / f"{package}.py"]
        for f in files:
            extra = rnnkit_imports(f) - allowed - {package}
            if extra:
                broken.append(f"{f.relative_to(ROOT)} imports {sorted(extra)} (docs/design.md allows {sorted(allowed)})")
    assert not broken, "\n".join(broken)
