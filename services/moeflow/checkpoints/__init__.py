"""Model checkpoints on local disk: tiny random test models, pulled real models, the cache.

Modules (import the one you need; this package imports nothing eagerly, so the torch-free
modules stay torch-free):
- `store`: the cache layout under MOEFLOW_HOME, listing and resolving models (no torch).
- `registry`: the models `moeflow models pull` knows (no torch).
- `metadata`: the `moeflow.json` file written into every checkpoint MoEFlow creates (no torch).
- `tiny`, `tiny_tokenizer`: `make_tiny(arch, out_dir, seed)` random HF checkpoints for tests.
- `pull`: `pull(name, home, progress)` downloads and converts a registry model to HF format.
- `cli`: the `moeflow models ...` subcommands.
"""
