# Sourced by scripts/test: Debian packages the tests need, installed when missing.
# PostgreSQL: the collector's tests run against a throwaway cluster of it.
# Chromium: the dashboard's browser tests drive it through Playwright (Debian's
# build, /usr/bin/chromium; Playwright never downloads browsers here).
# Without root (or sudo), this only says what is missing; the tests that need
# it are then skipped, except in CI (CI=true), where they fail.
need_debian_packages() {
    local missing=()
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
    [ -x /usr/bin/chromium ] || missing+=(chromium)
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
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
        || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
}
need_debian_packages
