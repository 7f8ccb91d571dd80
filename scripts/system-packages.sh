#!/usr/bin/env bash
# Installs the Debian packages that some tests use, when their commands are missing:
#   prometheus  (/usr/bin/prometheus, /usr/bin/promtool: the rule and config checks,
#                the end-to-end test's real Prometheus)
#   chromium    (the demo page test drives it headless)
# With apt-get as root (or password-less sudo) it installs them quietly; with everything
# present it returns at once. It never fails the build: when it cannot install, it says
# so and exits 0, and the tests that need the commands skip with a message.
set -u

need=()
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0

say() { echo "system-packages: $*"; }

if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get here; install ${need[*]} yourself, or the tests that need them skip"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    sudo=(sudo -n)
else
    say "not root and no password-less sudo; run: sudo apt-get install ${need[*]}" \
        "(until then the tests that need them skip)"
    exit 0
fi

log=$(mktemp "${TMPDIR:-/tmp}/system-packages.XXXXXX")
# Package scripts must not start the prometheus daemon: policy-rc.d 101 = "do not start".
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    if printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null 2>&1 \
        && "${sudo[@]}" chmod 755 "$policy"; then
        own_policy=1
    fi
fi
cleanup() {
    [ "$own_policy" -eq 1 ] && "${sudo[@]}" rm -f "$policy"
    rm -f "$log"
}
trap cleanup EXIT

say "installing ${need[*]} with apt-get (once; log in $log while it runs) ..."
export DEBIAN_FRONTEND=noninteractive
if "${sudo[@]}" apt-get update -qq >>"$log" 2>&1 \
    && "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$log" 2>&1; then
    say "installed ${need[*]}"
else
    say "could not install ${need[*]}; the tests that need them skip. Last lines of the log:"
    tail -n 15 "$log" | sed 's/^/    /'
fi
exit 0
