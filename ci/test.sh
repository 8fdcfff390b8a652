#!/usr/bin/env bash
# The project's test command (see README.md): set up the host, then format check, lints, and
# every test tier: unit, CLI, image checks with independent tools, and the QEMU boot.
#
# Image tests need root (mmdebstrap) and the Debian archive; downloaded packages and root
# filesystems are cached in $PICOIMG_CACHE_DIR (default /var/cache/picoimg), so later runs
# only assemble and boot.
set -euo pipefail
cd "$(dirname "$0")/.."

ci/setup-host.sh

# The binaries under test read boards/ and overlays/ from this checkout. (They also find the
# source tree they were compiled in, but a shared target directory can hold a build from
# another clone's path that cargo still considers fresh.)
export PICOIMG_DATA_DIR="$PWD"

# A normal user for the test that builds an image without root (mmdebstrap's unshare mode
# needs a subordinate id range, which useradd allocates once /etc/subuid exists).
if [ "$(id -u)" -eq 0 ] && ! id picoimg-ci >/dev/null 2>&1; then
  touch /etc/subuid /etc/subgid
  useradd --create-home --shell /bin/bash picoimg-ci
fi

step() { printf '\n==> %s\n' "$*"; }
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets --all-features -- -D warnings
step "first-boot agent for every board architecture (static musl)"
cargo build --release -p picoimg-firstboot \
  --target x86_64-unknown-linux-musl --target aarch64-unknown-linux-musl
step "cargo test (unit, CLI, image and QEMU boot tests)"
# Two test threads: the image build, the boot and the checks share one built image.
# Each line carries the seconds since the tests started, so the log shows what took long
# (the status is cargo's: pipefail).
cargo test --workspace --all-features -- --test-threads=2 2>&1 |
  perl -pe 'BEGIN { $| = 1; $t0 = time } printf "[%5ds] ", time - $t0'
