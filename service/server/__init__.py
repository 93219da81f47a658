"""Deployment: gunicorn's settings and the worker class the Procfile runs (no service code imported)."""
