"""A legacy-style Flask app that adopts llm-blueprint with two lines.

It has its own pages, a JSON API, its own error pages, JSON settings and
request hooks; mounting the blueprint under ``/llm`` changes none of them.
"""

from __future__ import annotations

import time

from flask import Flask, g, jsonify, render_template_string

from llm_blueprint import LLM
from llm_blueprint.settings import from_environment

INVENTORY = {"1": {"id": "1", "name": "hammer", "price": 12.5}, "2": {"id": "2", "name": "wrench", "price": 9.0}}

INDEX = """<!doctype html><title>Legacy Shop</title><h1>Legacy Shop</h1>
<ul>{% for item in items %}<li>{{ item.name }}: {{ item.price }}</li>{% endfor %}</ul>"""
NOT_FOUND = "<!doctype html><title>Not here</title><h1>Legacy Shop: page not found</h1>"


def create_app(config: dict | None = None, mount_llm: bool = True) -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="legacy-not-secret", LLM_URL_PREFIX="/llm")
    app.config.update(from_environment())
    app.config.update(config or {})
    app.json.sort_keys = False
    app.json.ensure_ascii = True

    @app.before_request
    def start_timer():
        g.started = time.monotonic()

    @app.after_request
    def stamp(response):
        response.headers["X-Legacy-App"] = "1"
        return response

    @app.errorhandler(404)
    def not_found(error):
        return NOT_FOUND, 404

    @app.route("/")
    def index():
        return render_template_string(INDEX, items=INVENTORY.values())

    @app.route("/api/items")
    def items():
        return jsonify({"items": list(INVENTORY.values()), "currency": "€"})

    @app.route("/api/items/<item_id>")
    def item(item_id):
        if item_id not in INVENTORY:
            return jsonify({"error": "no such item"}), 404
        return jsonify(INVENTORY[item_id])

    @app.route("/api/ping")
    def ping():
        return jsonify({"pong": True})

    if mount_llm:
        # Adopting the blueprint: these two lines.
        llm = LLM()
        llm.init_app(app)
    return app
