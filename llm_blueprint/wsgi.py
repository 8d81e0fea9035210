"""The WSGI app: a bare Flask app serving the model at the root.

    llm-blueprint serve    # prepares the model, then runs:
    gunicorn -c python:llm_blueprint.gunicorn_conf llm_blueprint.wsgi:app

Every ``LLM_*`` setting can be given as an environment variable of the same
name (see llm_blueprint/settings.py and the README).
"""

import logging

from flask import Flask

from llm_blueprint import LLM
from llm_blueprint.settings import from_environment

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")

app = Flask(__name__)
app.config.update(from_environment())
llm = LLM(app)
