"""The pipeline's stages: the mitmproxy addons a request passes, one concern each, in the
order addons/gateway.py lists them (docs/architecture.md draws the path)."""
