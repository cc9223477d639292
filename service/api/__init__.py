"""The vqtrain HTTP API (FastAPI): `app.create_app`, one router per resource in `routers/`, every dependency a
route takes in `deps`, the request and response bodies in `schemas`."""
