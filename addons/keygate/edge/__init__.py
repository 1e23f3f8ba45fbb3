"""What mitmproxy does before any addon hook runs, made safe: the HTTP/1 edge (head size,
folded lines, keygate's answers in place of mitmproxy's pages) and the redaction of
request bytes from mitmproxy's log lines. Installed once per process, outside the
reloadable pipeline."""
