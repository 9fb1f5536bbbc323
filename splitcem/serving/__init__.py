"""Deployed split inference: the server holds the tail, the client the encoder and defense.

* ``splitcem export RUN_DIR`` writes the two halves as separate files plus a spec
  (:mod:`splitcem.serving.deploy`, :func:`export_run`).
* ``splitcem serve RUN_DIR`` runs the server half behind FastAPI + uvicorn
  (:func:`serve`, :func:`create_app`, :class:`ServerHalf`); it never reads the client's
  weights.
* ``splitcem infer RUN_DIR IMAGE... --url URL`` / :class:`Client` encode images locally,
  apply the run's deployed defense, and send only features.

Features travel in the typed binary format of :mod:`splitcem.serving.wire`
(docs/serving.md). Inside the package imports point one way: :mod:`~splitcem.serving.wire`,
:mod:`~splitcem.serving.deploy` and the other support modules at the bottom, then
:mod:`~splitcem.serving.halves`, then :mod:`~splitcem.serving.export`, then
:mod:`~splitcem.serving.client` and :mod:`~splitcem.serving.server` (neither imports the
other). This package knows no training or attack code: it uses the models,
the defenses' transforms and the data normalisation only. ``fastapi`` and ``uvicorn`` (the
``serve`` extra) are needed by the server only.
"""

from splitcem.serving.client import Client, Prediction, ServerConnection
from splitcem.serving.deploy import read_spec
from splitcem.serving.export import ensure_export, export_model, export_run
from splitcem.serving.halves import ClientHalf, ServerHalf
from splitcem.serving.server import create_app, serve
from splitcem.serving.wire import FeatureLimits, WireError, decode_features, encode_features

__all__ = [
    "Client",
    "ClientHalf",
    "FeatureLimits",
    "Prediction",
    "ServerConnection",
    "ServerHalf",
    "WireError",
    "create_app",
    "decode_features",
    "encode_features",
    "ensure_export",
    "export_model",
    "export_run",
    "read_spec",
    "serve",
]
