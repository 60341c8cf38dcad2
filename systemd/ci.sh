#!/usr/bin/env bash
# Checks the units as CI does: `systemd-analyze verify` (syntax, directives, the template
# instantiated) and `systemd-analyze security --offline=true` (sandboxing), failing on an
# exposure above 2.0. No running systemd needed.
#
#   systemd/ci.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v systemd-analyze >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
max=2.0
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

# verify also checks that ExecStart's program exists and is executable: stand in an
# executable for /usr/bin/edgecase, the same unit text otherwise.
printf '#!/bin/sh\nexit 0\n' > "$work/edgecase"; chmod 755 "$work/edgecase"
mkdir "$work/units"
for u in systemd/*.service; do
  sed "s#/usr/bin/edgecase#$work/edgecase#g" "$u" > "$work/units/$(basename "$u")"
done
cp "$work/units/edgecase-connector@.service" "$work/units/edgecase-connector@site2.service"
(cd "$work/units" && systemd-analyze verify edgecase.service edgecase-connector@site2.service)
echo "systemd/ci.sh: systemd-analyze verify: edgecase.service, edgecase-connector@site2.service OK"

fail=0
for u in systemd/edgecase.service "$work/units/edgecase-connector@site2.service"; do
  out=$(systemd-analyze security --offline=true --no-pager "$(realpath "$u")" 2>&1) || true
  level=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for \([^:]*\): \([0-9.]*\).*/\2/p')
  name=$(basename "$u")
  if [ -z "$level" ]; then
    printf '%s\n' "$out" >&2; echo "systemd/ci.sh: no exposure figure for $name" >&2; fail=1; continue
  fi
  printf '%s\n' "$out" | grep '✗' || true
  echo "systemd/ci.sh: $name exposure $level (at most $max)"
  awk -v l="$level" -v m="$max" 'BEGIN{exit !(l <= m)}' || { echo "systemd/ci.sh: $name is over $max" >&2; fail=1; }
done
exit $fail
