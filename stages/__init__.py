"""The `kdmtl` command line: one thin module per command and DVC stage, and the click group."""
