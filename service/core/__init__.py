"""Foundation shared by every layer: settings, domain errors, endpoint definitions, vector helpers."""
