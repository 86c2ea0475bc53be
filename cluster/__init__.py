"""Kiln cluster operations: the `kiln` command and launchers that turn configs into processes."""
