"""asv benchmark suite of cinstnorm (run ``asv`` from the ``benchmarks/`` directory)."""
