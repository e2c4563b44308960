# Sourced by scripts/test: Debian packages the tests need, installed when missing.
# PostgreSQL: the collector's tests run against a throwaway cluster of it.
# Chromium: the dashboard's browser tests drive it through Playwright (Debian's
# build, /usr/bin/chromium; Playwright never downloads browsers here).
# Prometheus (with promtool): the alert rules, the Grafana dashboard's queries
# and /metrics are tested under a real server, which each test starts on a free
# port with its own configuration and storage (tests/support/prometheus.py);
# the package's own service is stopped and disabled, so that nothing holds
# port 9090 or scrapes in the background.
# Without root (or sudo), this only says what is missing; the tests that need
# it are then skipped, except in CI (CI=true), where they fail.
need_debian_packages() {
    local missing=()
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    { [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; } || missing+=(prometheus)
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
            echo "routelens tests: missing Debian packages: ${missing[*]} (apt-get install ${missing[*]})" >&2
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null; then
        echo "routelens tests: missing ${missing[*]} and no apt-get to install them" >&2
        return 0
    fi
    echo "Installing Debian packages: ${missing[*]}"
    local others=() packages
    for packages in "${missing[@]}"; do [ "$packages" = prometheus ] || others+=("$packages"); done
    if [ ${#others[@]} -gt 0 ]; then
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${others[@]}" >/dev/null \
            || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${others[@]}" >/dev/null; }
    fi
    if [ ${#others[@]} -lt ${#missing[@]} ]; then
        # Without recommends: they would bring prometheus-node-exporter, a service of its own.
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null \
            || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
        stop_packaged_prometheus "$sudo"
    fi
}
stop_packaged_prometheus() {
    local sudo="$1"
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/prometheus ]; then
        $sudo /etc/init.d/prometheus stop >/dev/null 2>&1 || true
        $sudo update-rc.d prometheus disable >/dev/null 2>&1 || true
    fi
}
need_debian_packages
