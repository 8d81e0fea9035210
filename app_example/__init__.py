"""A legacy-style Flask app (pages, a session login, a JSON API, its own error pages) that adopts llm-blueprint.

Adopting the blueprint is the two lines marked below. The app's login is
reused as the blueprint's auth hook, so its own chat page calls the LLM API
with the session cookie, while API clients (SDKs, scripts) use keys
(``LLM_API_KEYS``).

Users: ``APP_USERS`` as ``name:password,name:password`` (default ``demo:demo``).
"""

from __future__ import annotations

import functools
import hmac
import os
import secrets
import time

from flask import Flask, abort, g, jsonify, redirect, render_template, request, session, url_for
from werkzeug.security import check_password_hash, generate_password_hash

from llm_blueprint import LLM
from llm_blueprint.settings import from_environment

INVENTORY = {"1": {"id": "1", "name": "hammer", "price": 12.5}, "2": {"id": "2", "name": "wrench", "price": 9.0}}


def _users(spec: str) -> dict[str, str]:
    pairs = (entry.split(":", 1) for entry in spec.split(",") if ":" in entry)
    return {name.strip(): generate_password_hash(password) for name, password in pairs}


def login_required(view):
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not session.get("user"):
            return redirect(url_for("login", next=request.path))
        return view(*args, **kwargs)

    return wrapper


def session_may_use_llm(req) -> bool:
    """The blueprint's auth hook: a logged-in user of this app, on a request made by its own pages.

    The CSRF token (sent by the chat page as a header) keeps other sites from
    spending the user's session; API clients without a session use keys instead.
    """
    token = session.get("csrf")
    return bool(session.get("user") and token and hmac.compare_digest(req.headers.get("X-CSRF-Token", ""), token))


def create_app(config: dict | None = None, mount_llm: bool = True) -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY=os.environ.get("APP_SECRET_KEY") or secrets.token_hex(32), LLM_URL_PREFIX="/llm",
                      SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_HTTPONLY=True,
                      USERS=_users(os.environ.get("APP_USERS", "demo:demo")))
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
        return render_template("404.html"), 404

    @app.route("/")
    def index():
        return render_template("index.html", items=INVENTORY.values())

    @app.route("/login", methods=["GET", "POST"])
    def login():
        error = None
        if request.method == "POST":
            name, password = request.form.get("username", ""), request.form.get("password", "")
            stored = app.config["USERS"].get(name)
            if stored and check_password_hash(stored, password):
                session.clear()
                session["user"], session["csrf"] = name, secrets.token_urlsafe(32)
                target = request.args.get("next", "")
                return redirect(target if target.startswith("/") and not target.startswith("//") else url_for("index"))
            error = "Wrong user name or password."
        return render_template("login.html", error=error), 401 if error else 200

    @app.route("/logout", methods=["POST"])
    def logout():
        session.clear()
        return redirect(url_for("index"))

    @app.route("/chat")
    @login_required
    def chat():
        return render_template("chat.html", api_base=(app.config["LLM_URL_PREFIX"] or "") + "/v1")

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

    @app.route("/admin")
    def admin():
        abort(404)  # legacy routes that 404 keep the app's own page

    if mount_llm:
        # Adopting the blueprint: these two lines (the hook lets this app's own pages in).
        llm = LLM(LLM_AUTH_HOOK=session_may_use_llm)
        llm.init_app(app)
    return app
