"""The `upcycle` command line (installed as the package `upcycle_cli`)."""
