"""The `xattn` command line, one module per command group. Modules here parse, call the library, print and
exit; no math, and option names (`--start-layer`) appear only here."""
