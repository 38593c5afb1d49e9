"""nsa_cli: the `nsa` command-line tool. Parses, calls nsa_core, renders; no tensor logic here."""
