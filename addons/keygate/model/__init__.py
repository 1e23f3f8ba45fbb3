"""The configuration as values: gateway.toml's settings and channels, keys.yaml's key ring,
the endpoint table and the error codes. Pure: parsing and lookups, no mitmproxy hooks."""
