#!/usr/bin/env bash
# Installs what the browser and WHIP test tools need, on a fresh Debian
# machine (as root) or on one where it is already done (then it is quick):
#   - Debian's chromium          (/usr/bin/chromium; apt only if missing)
#   - Debian's firefox-esr, pulseaudio and iproute2 (tests/firefox.rs: the SDK in Firefox
#                                 in a network namespace, with a null sink the test's own
#                                 pulseaudio serves; apt only if missing)
#   - Debian's iptables          (tests/lossy_listeners.rs: iptables-legacy queues chorus's UDP
#                                 to tests/python/impair.py in the test's own namespace; apt
#                                 only if missing)
#   - Node deps of tests/browser (@millicast/sdk, playwright-core, puppeteer-core; npm ci
#                                 only if node_modules is missing or stale)
#   - Python venv tests/python/.venv with aiortc (only if missing or stale)
#   - Debian's redis-server      (the cluster tests start their own; apt only
#                                 if missing; never started or enabled here)
#   - Debian's nginx and curl    (tests/deploy.rs: chorus behind a TLS proxy; apt only if
#                                 missing; the test runs nginx itself, no service is started)
#   - Debian's coturn            (tests/reach.rs: TURN relay; apt only if missing; the test
#                                 runs turnserver itself on loopback, no service is started)
#   - Debian's janus             (tests/janus.rs, scripts/loadtest.sh --peer janus: Janus side by
#                                 side in the load test; apt only if missing; the load test runs
#                                 janus itself from its own config, no service is started)
# Usage: scripts/setup-test-deps.sh [--no-browser] [--no-python]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BROWSER_DIR="$ROOT/tests/browser"
PY_DIR="$ROOT/tests/python"
VENV="$PY_DIR/.venv"

want_browser=1
want_python=1
for a in "$@"; do
  case "$a" in
    --no-browser) want_browser=0 ;;
    --no-python) want_python=0 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "setup-test-deps: unknown option $a" >&2; exit 2 ;;
  esac
done

say() { echo "setup-test-deps: $*"; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
fi

apt_updated=0
apt_install() {
  # apt_install PKG... : install Debian packages (one apt-get update per run)
  export DEBIAN_FRONTEND=noninteractive
  if [ "$apt_updated" -eq 0 ]; then
    say "apt-get update"
    $SUDO apt-get update -q
    apt_updated=1
  fi
  say "apt-get install -y $*"
  $SUDO apt-get install -y -q "$@"
}

apt_install_no_service() {
  # apt_install_no_service PKG : install a package whose service the tests never use (they run
  # the binary themselves), and stop and disable that service where an init started it.
  apt_install "$1"
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now "$1" >/dev/null 2>&1 || true
  fi
}

# ------------------------------------------------------------------ browser
if [ "$want_browser" -eq 1 ]; then
  if [ -x /usr/bin/chromium ]; then
    say "chromium present: $(/usr/bin/chromium --version 2>/dev/null | head -n1)"
  else
    apt_install chromium
  fi
  # tests/firefox.rs: Firefox ESR, an audio server for its AudioContext (the test runs its own
  # pulseaudio with a null sink; nothing is started here) and `ip` for its network namespace.
  missing=()
  [ -x /usr/bin/firefox-esr ] || missing+=(firefox-esr)
  command -v pulseaudio >/dev/null 2>&1 || missing+=(pulseaudio)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  # tests/lossy_listeners.rs: the kernel has no netem; NFQUEUE (legacy iptables) feeds impair.py.
  command -v iptables-legacy >/dev/null 2>&1 || missing+=(iptables)
  if [ "${#missing[@]}" -gt 0 ]; then
    apt_install --no-install-recommends "${missing[@]}"
  else
    say "firefox-esr present: $(/usr/bin/firefox-esr --version 2>/dev/null | head -n1)"
  fi

  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
  fi
  node_major="$(node -p 'process.versions.node.split(".")[0]')"
  if [ "$node_major" -lt 20 ]; then
    echo "setup-test-deps: node $(node --version) is too old (playwright-core needs >= 20)" >&2
    exit 1
  fi

  # node_modules is "fresh" when npm's own record of the last install
  # (node_modules/.package-lock.json) is newer than package-lock.json and
  # package.json, and both dependencies resolve.
  stamp="$BROWSER_DIR/node_modules/.package-lock.json"
  fresh=1
  if [ ! -f "$stamp" ] || [ "$BROWSER_DIR/package-lock.json" -nt "$stamp" ] || [ "$BROWSER_DIR/package.json" -nt "$stamp" ]; then
    fresh=0
  elif ! (cd "$BROWSER_DIR" && node -e '
      const v = require("@millicast/sdk/package.json").version;
      const want = require("./package.json").dependencies["@millicast/sdk"];
      require.resolve("playwright-core");
      require.resolve("puppeteer-core");
      if (v !== want) process.exit(1);' >/dev/null 2>&1); then
    fresh=0
  fi
  if [ "$fresh" -eq 1 ]; then
    say "tests/browser/node_modules up to date"
  else
    say "npm ci in tests/browser"
    (cd "$BROWSER_DIR" && npm ci --no-audit --no-fund)
  fi
fi

# ------------------------------------------------------------------ python
if [ "$want_python" -eq 1 ]; then
  py="$(command -v python3 || true)"
  if [ -z "$py" ]; then
    apt_install python3 python3-venv
    py="$(command -v python3)"
  fi
  req="$PY_DIR/requirements.txt"
  stamp="$VENV/.requirements.installed"
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && cmp -s "$req" "$stamp" \
     && "$VENV/bin/python" -c 'import aiortc, av' >/dev/null 2>&1; then
    say "tests/python/.venv up to date ($("$VENV/bin/python" -c 'import aiortc; print("aiortc", aiortc.__version__)'))"
  else
    if [ ! -x "$VENV/bin/python" ]; then
      # Debian's python3 needs python3-venv (ensurepip) for venvs.
      if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        apt_install python3-venv
      fi
      say "creating venv tests/python/.venv with $("$py" --version)"
      rm -rf "$VENV"
      "$py" -m venv "$VENV"
    fi
    say "pip install -r tests/python/requirements.txt"
    "$VENV/bin/python" -m pip install -q -r "$req"
    cp "$req" "$stamp"
    say "installed $("$VENV/bin/python" -c 'import aiortc, av; print("aiortc", aiortc.__version__, "/ PyAV", av.__version__)')"
  fi
fi

# ------------------------------------------------------------------ redis
# tests/cluster.rs and the Redis registry's unit tests run their own
# redis-server on a free port; nothing here starts one.
if command -v redis-server >/dev/null 2>&1; then
  say "redis-server present: $(redis-server --version | head -n1)"
else
  apt_install redis-server
fi

# ------------------------------------------------------------------ reverse proxy
# tests/deploy.rs starts nginx as its own child (nginx -p DIR ...); Debian's package would also
# start the system service where an init runs it: it is stopped and disabled again at once when
# this script installed it, so only the test's own instance ever listens.
if [ "$want_browser" -eq 1 ]; then
  if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    say "nginx present: $(/usr/sbin/nginx -v 2>&1 | head -n1)"
  else
    apt_install_no_service nginx
  fi
  if ! command -v curl >/dev/null 2>&1; then
    apt_install curl
  fi
fi

# ------------------------------------------------------------------ TURN
# tests/reach.rs starts turnserver as its own child on free loopback ports; the package's
# service is stopped and disabled at once when this script installed it.
if [ "$want_browser" -eq 1 ]; then
  if command -v turnserver >/dev/null 2>&1; then
    say "coturn present: $(turnserver --version 2>/dev/null | head -n1)"
  else
    apt_install_no_service coturn
  fi
fi

# ------------------------------------------------------------------ Janus
# scripts/loadtest.sh --peer janus (and tests/janus.rs) runs janus as its own child from a config
# it writes; the package's service is stopped and disabled at once when this script installed it.
if command -v janus >/dev/null 2>&1; then
  say "janus present: $(janus --version 2>/dev/null | head -n1)"
else
  apt_install_no_service janus
fi

say "done"
