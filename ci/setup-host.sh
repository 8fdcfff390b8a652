#!/usr/bin/env bash
# Set up a Debian/Ubuntu host to build and test picoimg images.
#
# Installs the host tools (mmdebstrap, e2fsprogs, QEMU, firmware, bmap-tools, ...), registers
# qemu-user with binfmt_misc for foreign-architecture builds, and adds the rustup target the
# arm64 first-boot binary needs. Safe to run again: it only does what is missing.
#
# On Debian bookworm the QEMU and e2fsprogs we need come from bookworm-backports; the suite is
# added using the mirror already configured in the host's apt sources (no mirror is named here).
set -euo pipefail

log() { printf 'setup-host: %s\n' "$*" >&2; }

# Rust target for the arm64 first-boot binary (static musl, linked with rust-lld), plus the
# components the tests use; for the user who runs cargo, so not under sudo.
rust_setup() {
  command -v rustup >/dev/null 2>&1 || return 0
  for t in aarch64-unknown-linux-musl x86_64-unknown-linux-musl; do
    rustup target list --installed | grep -qx "$t" || rustup target add "$t" >/dev/null
  done
  for c in rustfmt clippy; do
    rustup component list --installed | grep -q "^$c" || rustup component add "$c" >/dev/null
  done
}

if [ "$(id -u)" -ne 0 ]; then
  rust_setup
  if ! command -v sudo >/dev/null 2>&1; then
    log "installing packages needs root: run this script as root"
    exit 1
  fi
  exec sudo PICOIMG_RUST_DONE=1 "$0" "$@"
fi

. /etc/os-release
export DEBIAN_FRONTEND=noninteractive

# The mirror URI the host already uses for its main suite, from deb822 or one-line sources.
host_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    awk -v suite="$VERSION_CODENAME" '
      BEGIN { RS=""; FS="\n" }
      {
        uris=""; ok=0
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); uris=$i }
          if ($i ~ /^Suites:/) { n=split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == suite) ok=1 }
        }
        if (ok && uris != "") { split(uris, u, /[ \t]+/); print u[1]; exit }
      }' "$f"
  done | head -n1
  grep -hsE "^deb[ \t]+(\[[^]]*\][ \t]+)?[a-z]+://[^ ]+[ \t]+${VERSION_CODENAME}[ \t]" \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
    sed -E 's/^deb[ \t]+(\[[^]]*\][ \t]+)?//' | awk '{print $1; exit}'
  return 0
}

bpo=()
if [ "${ID:-}" = debian ] && [ "${VERSION_CODENAME:-}" = bookworm ]; then
  if ! grep -rqsE 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(host_mirror | head -n1 || true)
    if [ -z "$mirror" ]; then
      log "no apt source for bookworm found to derive a backports mirror from"
      exit 1
    fi
    log "adding bookworm-backports from the host's mirror"
    cat >/etc/apt/sources.list.d/picoimg-backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  bpo=(-t bookworm-backports)
fi

# Tools picoimg runs to build images.
build_pkgs=(mmdebstrap uidmap e2fsprogs libarchive13 curl debian-archive-keyring arch-test qemu-user-static)
# Tools the tests use to check images and boot them.
test_pkgs=(fdisk dosfstools mtools bmap-tools xz-utils u-boot-tools qemu-system-x86 qemu-system-arm
  qemu-utils ovmf qemu-efi-aarch64 u-boot-qemu vde2 openssh-client iproute2 ca-certificates python3 file
  openssl
  # busybox-static: the rehearsal's Swarm service (`docker import` of a root with busybox httpd:
  # no registry is reachable) and its HTTP client on the nodes.
  busybox-static)

missing=()
for p in "${build_pkgs[@]}" "${test_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
# e2fsprogs must be new enough for `mke2fs -d` to read a tarball (1.47.1).
if dpkg --compare-versions "$(dpkg-query -W -f='${Version}' e2fsprogs 2>/dev/null || echo 0)" lt 1.47.1; then
  missing+=(e2fsprogs)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing: ${missing[*]}"
  apt-get update -qq
  # Packages with a backport get it (qemu-system-* must match qemu-utils from backports).
  apt-get install -y -qq --no-install-recommends "${bpo[@]}" "${missing[@]}" >/dev/null
fi

# binfmt_misc: register qemu-user so foreign-arch chroots run (arm64 boards).
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
for arch in aarch64; do
  if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$arch" ]; then
    conf="/usr/lib/binfmt.d/qemu-$arch.conf"
    if [ -r "$conf" ]; then
      log "registering qemu-$arch with binfmt_misc"
      grep -v '^#' "$conf" | head -n1 >/proc/sys/fs/binfmt_misc/register
    fi
  fi
done

[ -n "${PICOIMG_RUST_DONE:-}" ] || rust_setup
log "host ready"
