"""Printing measured figures: a markdown table on stdout and, optionally, JSON."""
from __future__ import annotations

import json


def report(figures: dict[str, float], json_path: str | None) -> None:
    print("| figure | value |\n| --- | --- |")
    for name, value in figures.items():
        print(f"| {name} | {value:.3f} |")
    save_json(figures, json_path)


def save_json(result: dict, json_path: str | None) -> None:
    """`result` as indented JSON at `json_path`, if one is given."""
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=2)
