"""`--labels FILE`: names for a classifier's classes or a VQA model's answers, when the checkpoint has none
(fine-tuned timm heads, LXMERT/VisualBERT answer lists shipped beside the weights).

FILE is JSON — a list of names, a map index → name (`{"0": "yes", ...}`), or a map name → index (VQA
`ans2label.json`) — or plain text with one name a line.
"""
from __future__ import annotations

import json
from pathlib import Path

from xattn_cli.errors import UsageError

NAMED_OUTPUTS = {"classify": "labels", "vqa": "answers"}  # adapter layout task → the attribute it names


def read_labels(path: str | Path) -> list[str]:
    """The names in FILE, by index."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot read labels file {path}: {error.strerror or error}") from None
    if path.suffix != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        names = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"labels file {path} is not valid JSON: {error.msg} (line {error.lineno})") from None
    if isinstance(names, dict) and names and all(isinstance(v, int) for v in names.values()):
        names = {str(index): name for name, index in names.items()}  # name → index, as in ans2label.json
    if isinstance(names, dict):
        try:
            by_index = {int(key): str(name) for key, name in names.items()}
        except ValueError:
            raise UsageError(f"labels file {path}: a map's keys must be indices (or its values, for name → index)") from None
        if sorted(by_index) != list(range(len(by_index))):
            raise UsageError(f"labels file {path}: the indices must run 0..{len(by_index) - 1} without gaps")
        return [by_index[i] for i in range(len(by_index))]
    if isinstance(names, list) and all(isinstance(name, str) for name in names):
        return names
    raise UsageError(f"labels file {path}: expected a list of names or a map between indices and names")


def apply_labels(adapter, path: str | Path) -> None:
    """Rename the adapter's classes (classifiers) or answers (VQA); the count must match the model's head."""
    attribute = NAMED_OUTPUTS.get(adapter.layout.task)
    if attribute is None:
        raise UsageError(f"a labels file is for classifiers and VQA models; {adapter.name} names its own outputs")
    names, current = read_labels(path), getattr(adapter, attribute)
    if len(names) != len(current):
        raise UsageError(f"labels file {path} names {len(names)} {attribute}; {adapter.name} has {len(current)}")
    setattr(adapter, attribute, names)
