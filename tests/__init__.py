"""The test suite (``tests.support``: helpers shared with ``bench/``)."""
