"""The ASGI app to serve: MONAI Label's, with the HLIP routes installed.

    monailabel start_server --app monailabel_app --studies ... --conf checkpoint ... \
        --uvicorn_app monailabel_app.asgi:app
"""
from monailabel.app import app

from monailabel_app.lib.routes import install

install(app)

__all__ = ["app"]
