"""Test helpers that are not fixtures: tiny hand-made datasets, small real recordings, and a
stand-in for the published model code. Importable as ``helpers`` from every test (pytest puts
tests/ on sys.path for tests/conftest.py)."""
