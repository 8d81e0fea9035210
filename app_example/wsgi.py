"""``gunicorn -c gunicorn.conf.py app_example.wsgi:app``"""

from app_example import create_app

app = create_app()
