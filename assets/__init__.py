"""Bundled weights and model folders, shipped as the package data `xattn_cli._assets` (see xattn_cli/config.py).

Demo images (images/) stay in the repository and do not ship."""
