"""The routes, one module per resource; each module is one flask-smorest Blueprint (one OpenAPI tag)."""

from service.api.routes import duplicates, endpoints, items, queries, training, versions, worker

# In the order Swagger UI lists them.
BLUEPRINTS = [endpoints.blp, queries.blp, training.blp, items.blp, duplicates.blp, versions.blp, worker.blp]
