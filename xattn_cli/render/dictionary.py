"""The report's view of a causal-attention (CATT) target's dictionary entries: each listed entry's index,
relevance and size beside its member crops.

The crops come from the dictionary file the run used, which its records' meta names (`dictionary`, an
absolute path, and `dictionary_sha256`); a folder moved to another machine can carry that file inside it.
A file that is missing, unreadable or changed since the run shows why instead of crops, never another
dictionary's. Each entry's strip (`dictionary.entry_strip`: members side by side, pixels as stored) is
embedded once as a style rule, however many targets list the entry.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from xattn_cli.errors import UsageError
from xattn_cli.render import escape, png_data_uri

if TYPE_CHECKING:
    from xattn_cli.dictionary import DictionaryFile

Found = Union["DictionaryFile", str]  # a dictionary file, or why it cannot be shown

STRIP_HEIGHT = 32  # pixels on the page per crop side (crops are 16 px: drawn at twice their size, unsmoothed)


class EntryStrips:
    """Renders targets' `dictionary` lists for the results in `folder`; `styles()` holds the strips."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[tuple[str, Any], Found] = {}  # (recorded path, sha256) → the file, or why none
        self.strips: dict[tuple[str, Any, int], tuple[str, str]] = {}  # … + entry → (CSS class, its rule)

    def cell(self, record: dict[str, Any], entries: list[dict[str, Any]]) -> str:
        """The HTML of one target's listed entries (nothing for none)."""
        if not entries:
            return ""
        meta = record.get("meta") or {}
        dictionary = self._file(meta.get("dictionary"), meta.get("dictionary_sha256"))
        lines = [self._entry(meta, dictionary, entry) for entry in entries]
        if isinstance(dictionary, str):
            lines.append(f"<small>no crops: {escape(dictionary)}</small>")
        return "<br>".join(lines)

    def styles(self) -> str:
        return "\n".join(rule for _, rule in self.strips.values())

    def _entry(self, meta: dict[str, Any], dictionary: Found, entry: dict[str, Any]) -> str:
        index = int(entry["entry"])
        text = f"#{index} · {float(entry['relevance']):.3g}"
        if "count" in entry:
            text += f" · {int(entry['count'])} points"
        if isinstance(dictionary, str) or not 0 <= index < dictionary.crops.shape[0]:
            return escape(text)
        key = (meta["dictionary"], meta.get("dictionary_sha256"), index)
        if key not in self.strips:
            css = f"strip-{len(self.strips)}"
            members = dictionary.crops.shape[1]
            self.strips[key] = (css, f".{css} {{ background-image: url({_strip_uri(dictionary, index)}); "
                                     f"width: {members * STRIP_HEIGHT}px; }}")
        members = "; ".join(f"{member['image']} region {member['region']}" for member in entry.get("members") or [])
        return (f'<span class="strip {self.strips[key][0]}" role="img" aria-label="entry {index} members" '
                f'title="{escape(members)}"></span> {escape(text)}')

    def _file(self, recorded: Any, sha256: Any) -> Found:
        """The dictionary file a run names (as recorded, else by name inside the folder), or why none."""
        if not isinstance(recorded, str):
            return "the run names no dictionary file"
        key = (recorded, sha256)
        if key not in self.files:
            self.files[key] = self._read(recorded, sha256)
        return self.files[key]

    def _read(self, recorded: str, sha256: Any) -> Found:
        """The first of the recorded path and its name inside the folder that holds the run's file."""
        from xattn_cli.dictionary import file_sha256, load_dictionary

        found = [path for path in (Path(recorded), self.folder / Path(recorded).name) if path.is_file()]
        same = [path for path in found if sha256 is None or file_sha256(path) == sha256]
        if not same:
            return f"{found[0]} changed since the run" if found else f"{recorded} not found"
        try:
            return load_dictionary(same[0])
        except UsageError as error:
            return str(error)


def _strip_uri(dictionary: "DictionaryFile", entry: int) -> str:
    from xattn_cli.dictionary import entry_strip

    buffer = io.BytesIO()
    entry_strip(dictionary, entry).save(buffer, format="PNG")
    return png_data_uri(buffer.getvalue())
