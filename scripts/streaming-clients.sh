#!/usr/bin/env bash
# Installs the third-party Bayeux (CometD) client the emulator's Streaming API test drives:
# faye from npm (the client jsforce uses for Salesforce streaming), into
# ${EDGECASE_NODE_DIR:-$HOME/.cache/edgecase-node}. Idempotent and quick when installed.
set -euo pipefail

dir="${EDGECASE_NODE_DIR:-$HOME/.cache/edgecase-node}"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "streaming-clients: node/npm are missing; run as root to install them" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
if [ ! -f "$dir/node_modules/faye/package.json" ]; then
  echo "streaming-clients: installing faye (npm) into $dir"
  mkdir -p "$dir"
  npm install --silent --no-audit --no-fund --prefix "$dir" faye@1.4 >/dev/null
fi
NODE_PATH="$dir/node_modules" node -e "require('faye')"
