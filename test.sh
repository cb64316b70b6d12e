#!/usr/bin/env bash
# The tests, on a fresh machine as on a developer's: installs the programs the tests drive
# when they are missing (Debian's packages, with apt-get as root or through sudo), then runs
# `cargo test --workspace` with any arguments given (`./test.sh -p cluster-core`).
#
# Without root or sudo it names the packages to install and stops: a test suite that skips
# half of itself in silence would pass for the wrong reason.
set -euo pipefail
cd "$(dirname "$0")"

# A program the tests run (or its alternatives, separated by |), and the Debian package that
# has it.
needs=(
    "wrk wrk"                                         # load in the reload, upgrade and dispatch tests
    "redis-server redis-server"                       # the config-agent example's store
    "redis-cli redis-tools"                           # the fleet test publishes a config
    "haproxy haproxy"                                 # the load balancer in front of the fleet test
    "ip iproute2"                                     # the fleet test's hosts (network namespaces)
    "setpriv util-linux"                              # clusterctl as another user
    "unshare util-linux"                              # the master as PID 1 of a namespace
    "systemd-socket-activate systemd"                 # socket activation
    "systemd-analyze systemd"                         # the unit files are checked
    "curl curl"                                       # server-sent events through a reload
    "ab apache2-utils"                                # HTTP/1.0 keep-alive through reloads
    "h2load nghttp2-client"                           # HTTP/2 through reloads
    "python3 python3"                                 # runs the WebSocket clients
    "promtool prometheus"                             # checks the metrics' text
    "tmux tmux"                                       # drives clusterctl top in a terminal
    "chromium|chromium-browser|google-chrome chromium" # renders the status page (any of the three)
)

missing=()
for entry in "${needs[@]}"; do
    read -r programs package <<<"$entry"
    found=
    for program in ${programs//|/ }; do
        command -v "$program" >/dev/null 2>&1 && found=1
    done
    [ -n "$found" ] || missing+=("$package")
done

if [ "${#missing[@]}" -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    if [ "$(id -u)" -eq 0 ]; then
        as_root=()
    elif command -v sudo >/dev/null 2>&1; then
        as_root=(sudo)
    else
        echo "test.sh: the tests need these Debian packages: ${missing[*]}" >&2
        echo "test.sh: install them (apt-get install ${missing[*]}) as root, then run ./test.sh again" >&2
        exit 1
    fi
    echo "test.sh: installing ${missing[*]} (Debian packages the tests drive)" >&2
    if ! { "${as_root[@]}" apt-get update -qq >/dev/null &&
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
        echo "test.sh: could not install ${missing[*]}; install them by hand and run ./test.sh again" >&2
        exit 1
    fi
fi

# Python modules the tests drive, from PyPI.
for module in websockets kubernetes_validate; do
    if ! python3 -c "import $module" 2>/dev/null; then
        echo "test.sh: installing the Python module $module (PyPI)" >&2
        user=()
        [ "$(id -u)" -eq 0 ] || user=(--user)
        if ! python3 -m pip install --quiet "${user[@]}" "${module//_/-}" >/dev/null; then
            echo "test.sh: could not install $module; run python3 -m pip install ${module//_/-}, then ./test.sh again" >&2
            exit 1
        fi
    fi
done

exec cargo test --workspace "$@"
