#!/usr/bin/env bash
# Builds the Edgecase .deb for one architecture with dpkg-deb:
#
#   packaging/deb.sh arm64|armhf|amd64 [BINARY]
#
# BINARY defaults to the static gateway build for that architecture, built if missing
# (arm64/armhf: cross/build.sh; amd64: a static release build on this host). Output:
# dist/edgecase_<version>-1_<arch>.deb. The package holds /usr/bin/edgecase, the units in
# /lib/systemd/system, /etc/edgecase/edgecase.toml (a conffile: kept on upgrade), the docs,
# and /var/lib/edgecase; its postinst creates the system user `edgecase` (in dialout) and
# enables the service. Install on a running Pi:  sudo apt install ./edgecase_..._arm64.deb
set -euo pipefail
cd "$(dirname "$0")/.."
arch=${1:-}
bin=${2:-}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
cross_dir=${CROSS_TARGET_DIR:-$PWD/target/cross}
case "$arch" in
  arm64) [ -n "$bin" ] || { bin=$cross_dir/aarch64-unknown-linux-gnu/release/edgecase; [ -x "$bin" ] || ./cross/build.sh aarch64; } ;;
  armhf) [ -n "$bin" ] || { bin=$cross_dir/armv7-unknown-linux-gnueabihf/release/edgecase; [ -x "$bin" ] || ./cross/build.sh armv7; } ;;
  amd64)
    if [ -z "$bin" ]; then
      host_dir=${CARGO_TARGET_DIR:-$PWD/target}
      bin=$host_dir/x86_64-unknown-linux-gnu/release/edgecase
      if [ ! -x "$bin" ]; then
        RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --release \
          --target x86_64-unknown-linux-gnu -p edgecase --no-default-features --bin edgecase
      fi
    fi ;;
  *) echo "usage: packaging/deb.sh arm64|armhf|amd64 [BINARY]" >&2; exit 2 ;;
esac
[ -x "$bin" ] || { echo "packaging/deb.sh: no binary at $bin" >&2; exit 1; }

stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
root=$stage/root
install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/edgecase" \
  "$root/usr/share/doc/edgecase/examples" "$root/var/lib/edgecase"
install -m 0755 "$bin" "$root/usr/bin/edgecase"
install -m 0644 systemd/edgecase.service "systemd/edgecase-connector@.service" "$root/lib/systemd/system/"
install -m 0640 packaging/edgecase.toml "$root/etc/edgecase/edgecase.toml"
install -m 0644 README.md systemd/README.md "$root/usr/share/doc/edgecase/" 2>/dev/null || install -m 0644 README.md "$root/usr/share/doc/edgecase/"
install -m 0644 examples/gateway.toml examples/readings.jsonl "$root/usr/share/doc/edgecase/examples/"
cat > "$root/usr/share/doc/edgecase/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: edgecase
License: Apache-2.0
 On Debian systems the license is in /usr/share/common-licenses/Apache-2.0.
COPY
install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$root/DEBIAN/"
echo /etc/edgecase/edgecase.toml > "$root/DEBIAN/conffiles"
size_kb=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: edgecase
Version: ${version}-${DEB_REVISION:-1}
Architecture: $arch
Maintainer: Edgecase maintainers <edgecase@localhost>
Installed-Size: $size_kb
Depends: adduser
Section: net
Priority: optional
Description: edge gateway agent: sensor readings to RabbitMQ, nothing lost
 Reads sensor readings from serial ports and MQTT, keeps each one in a crash-safe SQLite
 buffer until RabbitMQ has confirmed it, and turns defects into cases. One static binary,
 run as the sandboxed systemd service edgecase.service (Type=notify, progress watchdog).
CONTROL
mkdir -p dist
out=dist/edgecase_${version}-${DEB_REVISION:-1}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$out" >/dev/null
echo "packaging/deb.sh: $out ($(stat -c %s "$out") bytes)"
