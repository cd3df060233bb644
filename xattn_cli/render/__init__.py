"""Rendering of relevance maps: heatmap overlays for people to look at."""
