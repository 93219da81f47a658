"""Serving runtime: loaded versions and hot reload, queries, the job runner, and one process's wiring."""
