"""Bridges to the engines people already run their data through; each needs its own optional extra
(`pip install "xattn-cli[ray]"` for `xattn_cli.integrations.ray`). Nothing here is imported by the rest of
the package."""
