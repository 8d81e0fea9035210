"""The WSGI entry point of a checkout: ``gunicorn -c gunicorn.conf.py wsgi:app`` (the app is ``llm_blueprint.wsgi:app``)."""

from llm_blueprint.wsgi import app  # noqa: F401
