"""lcc_jax performance benchmarks (scripts, not tests): `python -m benchmarks.run --help`, and RESULTS.md."""
