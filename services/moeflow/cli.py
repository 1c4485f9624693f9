"""The `moeflow` console script: one entry point, one subcommand per process kind."""
