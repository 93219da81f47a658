"""Serving: the versions each worker has loaded (and hot reload), queries against them, filters."""
