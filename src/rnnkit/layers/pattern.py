"""Layer patterns: one argument naming the layer of every block of a stack, for hybrid stacks.

A pattern lists layer entries that are cycled to the stack's depth: block ``i`` of ``L`` uses entry
``i mod P``. Written as a string, entries are separated by commas (or ``+``, which stays one word in
comma-separated lists such as ``rnnkit bench tasks --models``); an entry is a registered name with
its own options, ``name:key=value:key=value`` (values are Python literals, bare words strings), and
a trailing ``*k`` repeats it ``k`` times:

- ``"lstm"``: one layer everywhere (every plain layer name is a pattern of one entry);
- ``"rglru,rglru,attention:window=1024"`` or ``"rglru*2,attention:window=1024"``: Griffin and
  RecurrentGemma (De et al. 2024), two recurrent blocks per local-attention block;
- ``"mamba*7,attention"``: a Jamba-like stack (Lieber et al. 2024), attention every 8th block;
- ``"mlstm*7,slstm"``: xLSTM[7:1] (Beck et al. 2024).

As a list, each entry is a name or a dict ``{"layer": name, **options}``:
``["rglru", "rglru", {"layer": "attention", "window": 1024}]``.

Options shared by every block (``ModelConfig.layer_options``, the keywords of ``stacked``) apply to
each entry; an entry's own options are added to them and win where both set a key.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Iterable

from rnnkit.errors import InputError, describe
from rnnkit.layers.registry import spec

#: Characters that separate the entries of a pattern string.
SEPARATORS = ",+"
_REPEAT = re.compile(r"^(.*)\*\s*(\d+)\s*$", re.S)

Entry = tuple[str, dict[str, Any]]


def parse_value(raw: str) -> Any:
    """A Python literal (``1024``, ``True``, ``0.5``, ``None``), or the text itself for a bare word."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def parse_entry(text: str, name: str) -> Entry:
    """``name:key=value:...`` as the name and its options (``name`` names the argument in errors)."""
    head, *parts = text.strip().split(":")
    options: dict[str, Any] = {}
    for part in parts:
        if "=" not in part:
            raise InputError(f"{name}: expected name:key=value, got {text!r}")
        key, raw = part.split("=", 1)
        options[key.strip()] = parse_value(raw.strip())
    return head.strip(), options


def parse_pattern(pattern: object, name: str = "layer") -> list[Entry]:
    """The entries of a pattern (a string or a list; see the module docstring), each ``(layer name,
    its own options)``, with repetitions written out; every name is checked to be registered.

    Raises:
        InputError: an empty pattern, an unknown name, a malformed entry or repeat count.

    Example:
        >>> parse_pattern("rglru*2,attention:window=1024")
        [('rglru', {}), ('rglru', {}), ('attention', {'window': 1024})]
    """
    if isinstance(pattern, str):
        items: list[Any] = [part for part in re.split(f"[{re.escape(SEPARATORS)}]", pattern)]
    elif isinstance(pattern, (list, tuple)):
        items = list(pattern)
    else:
        raise InputError(f"{name}: expected a layer name, a pattern string or a list of entries, got {describe(pattern)}")
    entries: list[Entry] = []
    for item in items:
        repeat = 1
        if isinstance(item, str):
            match = _REPEAT.match(item)
            if match:
                item, repeat = match.group(1), int(match.group(2))
                if repeat < 1:
                    raise InputError(f"{name}: expected a repeat count >= 1 after '*', got {match.group(0)!r}")
            layer, options = parse_entry(item, name)
        elif isinstance(item, dict) and isinstance(item.get("layer"), str):
            options = {k: v for k, v in item.items() if k != "layer"}
            layer = item["layer"]
        else:
            raise InputError(f"{name}: expected entries that are names or dicts with a 'layer' name, got {item!r}")
        if not layer:
            raise InputError(f"{name}: expected a layer name in every entry, got an empty one in {pattern!r}")
        spec(layer)  # an unknown name raises, listing the registered ones
        entries += [(layer, dict(options)) for _ in range(repeat)]
    if not entries:
        raise InputError(f"{name}: expected at least one layer, got {pattern!r}")
    return entries


def expand_pattern(pattern: object, depth: int, shared: dict[str, Any] | None = None,
                   name: str = "layer") -> list[Entry]:
    """The ``(layer name, options)`` of each of ``depth`` blocks: the pattern cycled to ``depth``, each
    entry's options over the ``shared`` ones.

    Example:
        >>> [n for n, _ in expand_pattern("mamba*3,attention", 8)]
        ['mamba', 'mamba', 'mamba', 'attention', 'mamba', 'mamba', 'mamba', 'attention']
    """
    entries = parse_pattern(pattern, name)
    return [(layer, {**(shared or {}), **options}) for layer, options in
            (entries[i % len(entries)] for i in range(depth))]


def with_depth(entries: list[Entry]) -> list[Entry]:
    """``entries`` (one per block of a stack, as :func:`expand_pattern` gives them) with ``depth`` =
    block index / number of blocks added to the options of every layer that takes one
    (``Recurrence.takes_depth``: ``hgrn2``'s forget-gate floor, the RWKV layers' initialisation),
    unless the options already give it.

    Example:
        >>> [o["depth"] for _, o in with_depth(expand_pattern("hgrn2", 4))]
        [0.0, 0.25, 0.5, 0.75]
    """
    count = len(entries)
    return [(layer, {"depth": index / count, **options}) if spec(layer).cls.takes_depth else (layer, options)
            for index, (layer, options) in enumerate(entries)]


def format_pattern(pattern: object, separator: str = ",") -> str:
    """A pattern as one canonical string (runs of equal entries as ``*k``, options sorted), e.g. for
    labels and file names: ``format_pattern(["rglru", "rglru", "attention"])`` is ``"rglru*2,attention"``."""
    if separator not in SEPARATORS:
        raise InputError(f"separator: expected one of {list(SEPARATORS)}, got {separator!r}")
    words: list[str] = []
    previous, count = None, 0
    for entry in parse_pattern(pattern) + [None]:  # type: ignore[list-item]
        word = None if entry is None else ":".join([entry[0]] + [f"{k}={v}" for k, v in sorted(entry[1].items())])
        if word == previous:
            count += 1
            continue
        if previous is not None:
            words.append(previous if count == 1 else f"{previous}*{count}")
        previous, count = word, 1
    return separator.join(words)


def common_modes(layers: Iterable[Any]) -> tuple[str, ...]:
    """The modes every one of ``layers`` declares, in the first one's order (``recurrent`` first)."""
    layers = list(layers)
    return tuple(m for m in layers[0].modes if all(m in layer.modes for layer in layers[1:]))
