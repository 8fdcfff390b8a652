#!/usr/bin/env bash
# Benchmark (a command, not a test): one table of build times from one run.
#
#   ci/bench-build.sh [PICOIMG]
#
# Rows: h4-base cold (empty cache: packages downloaded, root made, every block compressed),
# h4-base warm (a new output directory after an overlay change: root from the cache, changed
# blocks compressed), h4-base no-op (same inputs, same output directory), c5-base cold, c5
# consul over the cached c5 base (a stack layer), c5-base warm after an overlay change.
# Columns: wall time and each stage's seconds as picoimg logs them ("<stage> done in Ns");
# "other" is the rest (planning, checksums, publishing).
#
# UBOOT=FILE: the C5's u-boot (default: the copy in builder/tests/data).
# The cache is a fresh directory (CACHE=DIR to use another, then "cold" is not cold) and is
# removed at the end unless KEEP=1. Runs as root (mmdebstrap's root mode). Set XZ_LEVEL to
# benchmark another level (default: picoimg's default).
set -euo pipefail
picoimg=$(realpath "${1:-target/release/picoimg}")
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /var/tmp/picoimg-bench.XXXXXX)
cache=${CACHE:-$work/cache}
cleanup() { if [ "${KEEP:-0}" != 1 ]; then rm -rf "$work"; fi; }
trap cleanup EXIT
level=()
if [ -n "${XZ_LEVEL:-}" ]; then level=(--xz-level "$XZ_LEVEL"); fi

# A copy of the data directory whose overlay can change without touching the checkout.
data=$work/data
mkdir -p "$data"
cp -a "$here/boards" "$here/overlays" "$data/"

# A stack's layer is the root column too; building the first-boot agent (a cold cache) has
# its own.
stages=("root filesystem|stack layer" "first-boot agent" "applying overlays" "disk image" "block map" "compressing")
printf '%-34s %8s' "build" "wall s"
for s in "${stages[@]}"; do printf ' %10s' "${s%% *}"; done
printf ' %8s  %s\n' "other" "xz size"

row() {
  local name=$1 out=$2; shift 2
  local log=$work/log t0 t1
  touch "$work/mark"
  t0=$(date +%s.%N)
  PICOIMG_CACHE_DIR=$cache "$picoimg" build --data-dir "$data" --out "$out" "${level[@]}" "$@" \
    >/dev/null 2>"$log" || { cat "$log" >&2; exit 1; }
  t1=$(date +%s.%N)
  local wall sum=0 v
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
  printf '%-34s %8s' "$name" "$wall"
  for s in "${stages[@]}"; do
    v=$({ grep -E "^picoimg: ($s).* done in " "$log" || true; } | sed -E 's/.* done in ([0-9.]+)s$/\1/' | awk '{t+=$1} END{printf "%.1f", t}')
    printf ' %10s' "$v"
    sum=$(awk -v a="$sum" -v b="$v" 'BEGIN{print a+b}')
  done
  local xz
  xz=$(find "$out" -maxdepth 1 -name '*.img.xz' -newer "$work/mark" -printf '%s\n' 2>/dev/null | head -1)
  printf ' %8s  %s\n' "$(awk -v w="$wall" -v s="$sum" 'BEGIN{printf "%.1f", w-s}')" "${xz:-unchanged}"
}

touch_overlay() {
  mkdir -p "$data/overlays/base/rootfs/etc"
  echo "# bench $(date +%s%N)" >> "$data/overlays/base/rootfs/etc/motd.picoimg-bench"
}

row "h4-base cold" "$work/h4a" --board h4
touch_overlay
row "h4-base warm (overlay changed)" "$work/h4b" --board h4
row "h4-base no-op" "$work/h4b" --board h4
# Hardkernel's signed u-boot for the C5, vendored in the tests' data (their site is not
# reachable from every machine); checked against the board's pin like a download.
uboot=(--uboot "${UBOOT:-$here/builder/tests/data/odroid-c5/u-boot.bin.signed}")
row "c5-base cold" "$work/c5a" --board c5 "${uboot[@]}"
row "c5-consul (layer over cached base)" "$work/c5c" --board c5 --stack consul --sources debian "${uboot[@]}"
touch_overlay
row "c5-base warm (overlay changed)" "$work/c5b" --board c5 "${uboot[@]}"
