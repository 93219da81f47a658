"""The application: `Service`, the one way in (every HTTP view and CLI command calls its methods),
the plain results it returns, and one process's wiring (`build_service`)."""
