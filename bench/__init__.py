"""The specbridge benchmark (`python bench/run.py`); one module per purpose, see `run.py`."""
