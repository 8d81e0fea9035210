"""The WSGI entry point: a bare Flask app serving the model at the root.

    gunicorn -c gunicorn.conf.py wsgi:app

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
