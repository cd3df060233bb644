"""setuptools reads everything from pyproject.toml but the package list, computed here so that a new
subpackage ships without a config edit: every xattn_cli package in the tree, plus the data packages that
pyproject.toml maps onto the root folders configs/ and assets/ (read through xattn_cli.config.data_path).
Data folders with importable names are listed too: setuptools ships files only from listed packages."""
from setuptools import find_packages, setup

DATA_PACKAGES = ["xattn_cli._configs", "xattn_cli._assets", "xattn_cli._assets.weights", "xattn_cli._assets.models"]

setup(packages=find_packages(include=["xattn_cli", "xattn_cli.*"]) + DATA_PACKAGES)
