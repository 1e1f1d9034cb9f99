"""The gateway application: the HTTP ingress (`gateway_deployment`, its FastAPI app in `http_app` and
the route modules), the plain services the routes call (answers, embeddings, knowledge-base requests),
and the KnowledgeBases manager deployment that runs every change to the knowledge bases."""
