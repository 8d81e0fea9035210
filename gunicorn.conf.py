"""gunicorn settings of a checkout: ``gunicorn -c gunicorn.conf.py wsgi:app`` (they live in ``llm_blueprint/gunicorn_conf.py``)."""

from llm_blueprint.gunicorn_conf import *  # noqa: F401,F403
