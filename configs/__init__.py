"""Model configurations, shipped as the package data `xattn_cli._configs` (see xattn_cli/config.py)."""
