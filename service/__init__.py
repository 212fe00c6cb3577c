"""Settings, topology, wiring and the `intygstjanst` command line: the one composition root."""
