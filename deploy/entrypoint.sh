#!/bin/sh
# keygate's container entrypoint. It puts mitmdump's command line together, then hands it
# to the mitmproxy image's own entrypoint, which starts the mitmproxy tools (and nothing
# else) as the image's unprivileged mitmproxy user: the gateway never runs as root. The
# `keygate` command's file tools run as root, as under docker exec, and keep the owner and
# mode of each file they edit.
#
#   docker run ... keygate                          keygate on port 3000
#   docker run ... keygate --set flow_detail=0      the same, with more mitmdump options
#   docker run ... keygate keys list                the `keygate` command: keys, channels, usage
#   docker run ... keygate sh                       any other command runs as given
set -eu

case "${1:-}" in
    "" | -*)
        set -- mitmdump \
            --mode "reverse:${KEYGATE_UPSTREAM}" \
            --listen-port 3000 \
            -s /keygate/addons/gateway.py \
            --set keygate_config=/keygate/config/gateway.toml \
            --set block_global=false \
            --set connection_strategy=lazy \
            "$@"
        ;;
    keys | channels | usage)
        set -- keygate "$@"
        ;;
esac
exec docker-entrypoint.sh "$@"
