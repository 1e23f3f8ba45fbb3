"""keygate: API keys, per-key policy, routing and usage accounting for self-hosted LLM servers.

The mitmproxy entry point is addons/gateway.py; this package holds the addon classes and
the pure parsing they are built from.
"""
