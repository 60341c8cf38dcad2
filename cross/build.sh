#!/usr/bin/env bash
# Builds statically linked, stripped `edgecase` (gateway build: no demo) and `edgecase-sim`
# for an ARM gateway with Debian's Rust toolchain and cross gcc.
#
#   cross/build.sh aarch64      # Raspberry Pi 3/4/5 (and Zero 2 W) on a 64-bit OS
#   cross/build.sh armv7        # the same boards on 32-bit Raspberry Pi OS (armhf)
#   cross/build.sh --install-only armv7    # only install the toolchain if it is missing
#                                          # (exit status 1 if it cannot be installed)
#
# Output: $CROSS_TARGET_DIR/<triple>/release/{edgecase,edgecase-sim}; CROSS_TARGET_DIR
# defaults to target/cross (a tree of its own: Debian's rustc and rustup's do not share
# build artefacts). Installs what it needs on first use (cross/setup.sh, as root).
set -euo pipefail
cd "$(dirname "$0")/.."

install_only=false
if [ "${1:-}" = --install-only ]; then
  install_only=true
  shift
fi
target=${1:-}
case "$target" in
  aarch64) triple=aarch64-unknown-linux-gnu; gcc=aarch64-linux-gnu; arch=arm64; qemu=qemu-aarch64-static ;;
  armv7) triple=armv7-unknown-linux-gnueabihf; gcc=arm-linux-gnueabihf; arch=armhf; qemu=qemu-arm-static ;;
  *) echo "usage: cross/build.sh [--install-only] aarch64|armv7" >&2; exit 2 ;;
esac

# Installed already? Otherwise install (needs root and Debian's package registry).
ready() {
  local rustc std
  rustc=$(dpkg-query -W -f='${Version}' rustc-web 2>/dev/null) || return 1
  std=$(dpkg-query -W -f='${Version}' "libstd-rust-web-dev:$arch" 2>/dev/null) || return 1
  [ "$rustc" = "$std" ] && command -v "$gcc-gcc" >/dev/null && command -v "$qemu" >/dev/null
}
ready || ./cross/setup.sh "$target"
if $install_only; then
  exit 0
fi

export CARGO_TARGET_DIR=${CROSS_TARGET_DIR:-$PWD/target/cross}
upper=$(echo "$triple" | tr 'a-z-' 'A-Z_')
export "CARGO_TARGET_${upper}_LINKER=$gcc-gcc"
export "CARGO_TARGET_${upper}_RUNNER=$qemu"
# Static glibc: one file to copy onto the card, nothing to match on the Pi's OS.
export "CARGO_TARGET_${upper}_RUSTFLAGS=-C target-feature=+crt-static"
# Debian's compiler with its ARM standard library (rustup has no ARM std here).
export RUSTC=/usr/bin/rustc
cargo=/usr/bin/cargo

start=$(date +%s)
# The workspace release profile: fat LTO, one codegen unit, panic=abort, stripped.
# --no-default-features leaves out `edgecase demo` (its embedded broker).
"$cargo" build --locked --release --target "$triple" \
  -p edgecase --no-default-features --bin edgecase \
  -p edgecase-sim --bin edgecase-sim
took=$(( $(date +%s) - start ))

out="$CARGO_TARGET_DIR/$triple/release"
for bin in edgecase edgecase-sim; do
  f="$out/$bin"
  if "$gcc-readelf" -l "$f" | grep -q "Requesting program interpreter"; then
    echo "cross/build.sh: $f is dynamically linked" >&2; exit 1
  fi
  bytes=$(stat -c %s "$f")
  printf '%s: %s bytes (%s MiB), static, stripped\n' "$f" "$bytes" "$(awk "BEGIN{printf \"%.1f\", $bytes/1048576}")"
done
# The gateway binary's budget.
limit=$((12 * 1024 * 1024))
size=$(stat -c %s "$out/edgecase")
if [ "$size" -ge "$limit" ]; then
  echo "cross/build.sh: $out/edgecase is $size bytes, over the 12 MiB budget" >&2; exit 1
fi
"$qemu" "$out/edgecase" --version
echo "cross/build.sh: $target built in ${took}s"
