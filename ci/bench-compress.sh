#!/usr/bin/env bash
# Benchmark: compress one raw image at several xz levels (2 threads, as picoimg does) and with
# zstd, and report wall time, size, and the time to decompress. Usage:
#   ci/bench-compress.sh IMAGE.img [xz levels...]
# IMAGE.img is a raw image (`picoimg build --keep-raw`). Run it on a quiet machine.
set -euo pipefail
raw=${1:?usage: ci/bench-compress.sh IMAGE.img [LEVEL...]}
shift
levels=("$@")
[ ${#levels[@]} -gt 0 ] || levels=(0 1 2 3 6)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }
row() {
  local name=$1 out=$2; shift 2
  local t0 t1 t2
  t0=$(date +%s.%N)
  "$@" < "$raw" > "$out"
  t1=$(date +%s.%N)
  case $out in
    *.xz) xz -dc -T2 "$out" > /dev/null ;;
    *.zst) zstd -dcq "$out" > /dev/null ;;
  esac
  t2=$(date +%s.%N)
  printf '%-14s %8s s  %14s bytes  %8s s to decompress\n' "$name" "$(secs "$t0" "$t1")" \
    "$(stat -c %s "$out")" "$(secs "$t1" "$t2")"
  rm -f "$out"
}
echo "image $raw: $(stat -c %s "$raw") bytes, $(du -B1 "$raw" | cut -f1) allocated, $(nproc) cores"
for l in "${levels[@]}"; do
  row "xz -$l -T2" "$work/i.xz" xz -c -"$l" -T2
done
for l in 3 10 19; do
  row "zstd -$l -T2" "$work/i.zst" zstd -q -c -"$l" -T2
done
