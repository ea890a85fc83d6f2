"""`python -m benchmarks.reference_torch`: see `cli`."""

from .cli import main

main()
