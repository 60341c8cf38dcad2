#!/usr/bin/env bash
# Installs the third-party Salesforce clients the emulator's faithfulness tests drive:
# Python's simple-salesforce (PyPI) and jsforce (npm, into salesforce-emulator/tests/jsforce);
# and fastavro (PyPI), the independent Avro reader of the PushTopic tests.
# Idempotent and quick when already installed.
set -euo pipefail

if ! command -v python3 >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "salesforce-clients: python3 is missing; run as root to install it" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-pip >/dev/null
fi
if ! python3 -c "import simple_salesforce, jwt, cryptography" >/dev/null 2>&1; then
  echo "salesforce-clients: installing simple-salesforce (PyPI)"
  # Debian's own python3 refuses global installs without --break-system-packages (PEP 668).
  python3 -m pip install -q --disable-pip-version-check simple-salesforce 2>/dev/null \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages simple-salesforce
fi
python3 -c "import simple_salesforce" >/dev/null
# fastavro: an independent Avro reader for the PushTopic source's AVRO bodies.
if ! python3 -c "import fastavro" >/dev/null 2>&1; then
  echo "salesforce-clients: installing fastavro (PyPI)"
  python3 -m pip install -q --disable-pip-version-check fastavro 2>/dev/null \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages fastavro
fi
python3 -c "import fastavro" >/dev/null

if ! command -v npm >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "salesforce-clients: npm is missing; run as root to install it" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
JS_DIR="$(dirname "$0")/../salesforce-emulator/tests/jsforce"
if [ ! -f "$JS_DIR/node_modules/jsforce/package.json" ]; then
  echo "salesforce-clients: installing jsforce (npm)"
  (cd "$JS_DIR" && npm install --no-audit --no-fund --silent)
fi
