"""Composition: `factory.create_app` builds the FastAPI app (middleware, every protocol's routers) and
`components` holds the parts that run from start-up to shutdown, entered in the lifespan on an
`AsyncExitStack` and stopped in reverse. The one package that may import every other."""
