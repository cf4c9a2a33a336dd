"""CLI subcommands, one module each (see `t5forge.cli`)."""
