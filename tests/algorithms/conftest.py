"""The algorithm tests share ``tiny_data`` and ``make_loop`` with the rest of the suite (tests/conftest.py)."""
