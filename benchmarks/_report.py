"""Printing measured figures: a markdown table on stdout and, optionally, JSON."""
from __future__ import annotations

import json


def report(figures: dict[str, float], json_path: str | None) -> None:
    print("| figure | value |\n| --- | --- |")
    for name, value in figures.items():
        print(f"| {name} | {value:.3f} |")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(figures, handle, indent=2)
