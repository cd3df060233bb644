"""The `xattn` command line. Modules here parse, call the library, print and exit; no math."""
