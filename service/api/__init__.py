"""HTTP: the app factory, one routes module per resource, schemas, tokens, error handlers (the only Flask)."""
