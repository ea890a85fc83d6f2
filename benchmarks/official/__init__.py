"""Run the RestoreLCC authors' own code on lcc_jax's inputs and compare stage by stage (README.md)."""
