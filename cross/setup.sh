#!/usr/bin/env bash
# Installs the cross toolchain from Debian's packages: Debian's rustc-web (bookworm-security)
# with the ARM standard libraries of the same version, the ARM gcc/binutils/libc used as
# linkers, and qemu-user-static to run ARM binaries on this x86_64 host.
#
#   cross/setup.sh [aarch64|armv7]...      (default: aarch64 armv7; needs root)
#
# Idempotent. Debian 12 (bookworm) only; see cross/README.md for why each step is there.
set -euo pipefail

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(aarch64 armv7)
[ "$(id -u)" = 0 ] || { echo "cross/setup.sh: run as root (it installs Debian packages)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

declare -A ARCH=([aarch64]=arm64 [armv7]=armhf)
declare -A GCC=([aarch64]=gcc-aarch64-linux-gnu [armv7]=gcc-arm-linux-gnueabihf)
declare -A LIBC=([aarch64]=libc6-dev-arm64-cross [armv7]=libc6-dev-armhf-cross)

archs=()
for t in "${targets[@]}"; do
  [ -n "${ARCH[$t]:-}" ] || { echo "cross/setup.sh: unknown target $t (aarch64 or armv7)" >&2; exit 2; }
  archs+=("${ARCH[$t]}")
done

# The ARM standard library must come from bookworm-security, where rustc-web lives. Limit
# that stanza to the architectures needed: a security index for another architecture that
# is mid-sync makes apt drop the whole suite, for amd64 too.
sources=/etc/apt/sources.list.d/debian.sources
# If anything below fails, put the stanza back as it was: a stanza naming an architecture
# whose index is broken makes apt ignore bookworm-security for every package on the machine.
added_archs=()
restore_sources() {
  for a in "${added_archs[@]}"; do dpkg --remove-architecture "$a" 2>/dev/null || true; done
  if [ -f "$sources.cross-setup" ]; then
    mv "$sources.cross-setup" "$sources"
    apt-get update -qq >/dev/null 2>&1 || true
  fi
}
explain_armhf() {
  for t in "${targets[@]}"; do
    if [ "$t" = armv7 ] && grep -qs armhf /tmp/cross-setup-update.log /tmp/cross-setup-apt.log; then
      echo "cross/setup.sh: the armv7 standard library (libstd-rust-web-dev:armhf) cannot be installed:" >&2
      echo "  the mirror's bookworm-security armhf index does not match its signed Release (a mirror" >&2
      echo "  mid-sync), and bookworm's own older libstd-rust does not match rustc-web. A mirror state," >&2
      echo "  not a code fault: rerun later. The apt sources were put back as they were." >&2
    fi
  done
}
trap 'rc=$?; if [ $rc != 0 ]; then explain_armhf; restore_sources; fi' EXIT
if [ -f "$sources" ]; then
  cp -p "$sources" "$sources.cross-setup"
  want="amd64 $(printf '%s\n' "${archs[@]}" | sort -u | tr '\n' ' ' | sed 's/ $//')"
  python3 - "$sources" "$want" <<'PY'
import sys
path, want = sys.argv[1], sys.argv[2]
stanzas = open(path).read().split("\n\n")
out = []
for s in stanzas:
    lines = s.strip("\n").split("\n")
    if any(l.startswith("Suites:") and "security" in l for l in lines):
        have = [l for l in lines if l.startswith("Architectures:")]
        cur = set(have[0].split(":", 1)[1].split()) if have else set()
        new = sorted(cur | set(want.split()))
        lines = [l for l in lines if not l.startswith("Architectures:")]
        lines.insert(1, "Architectures: " + " ".join(new))
    out.append("\n".join(lines))
text = "\n\n".join(out).rstrip("\n") + "\n"
if text != open(path).read():
    open(path, "w").write(text)
PY
fi

for a in "${archs[@]}"; do
  dpkg --print-foreign-architectures | grep -qx "$a" || { dpkg --add-architecture "$a"; added_archs+=("$a"); }
done
# apt-get update exits 0 on some index failures; its warnings are what tell.
if ! apt-get update -qq >/tmp/cross-setup-update.log 2>&1 || grep -q "^[EW]: .*bookworm-security" /tmp/cross-setup-update.log; then
  cat /tmp/cross-setup-update.log >&2
  exit 1
fi

pkgs=(rustc-web cargo-web qemu-user-static)
for t in "${targets[@]}"; do
  pkgs+=("libstd-rust-web-dev:${ARCH[$t]}" "${GCC[$t]}" "${LIBC[$t]}")
done
if ! apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/tmp/cross-setup-apt.log 2>&1; then
  tail -20 /tmp/cross-setup-apt.log >&2
  exit 1
fi

# The standard library must be exactly the compiler's version.
rustc_ver=$(dpkg-query -W -f='${Version}' rustc-web)
for t in "${targets[@]}"; do
  std_ver=$(dpkg-query -W -f='${Version}' "libstd-rust-web-dev:${ARCH[$t]}" 2>/dev/null || true)
  if [ "$std_ver" != "$rustc_ver" ]; then
    echo "cross/setup.sh: libstd-rust-web-dev:${ARCH[$t]} is '${std_ver:-missing}' but rustc-web is $rustc_ver;" >&2
    echo "  the $t standard library must match the compiler exactly (a mirror mid-sync; rerun later)." >&2
    exit 1
  fi
done
rm -f "$sources.cross-setup"
echo "cross/setup.sh: rustc-web $rustc_ver with the standard library for ${targets[*]}; $(qemu-aarch64-static --version | head -1)"
