#!/usr/bin/env bash
# Benchmark: write one image to a file target three ways and report bytes written (allocated
# in the target) and wall time. Usage: ci/bench-flash.sh IMAGE.img.xz [PICOIMG]
# The image's .img.bmap must sit beside it (picoimg build writes one).
set -euo pipefail
xz=${1:?usage: ci/bench-flash.sh IMAGE.img.xz [PICOIMG]}
picoimg=${2:-target/release/picoimg}
bmap=${xz%.xz}.bmap
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mapped=$(sed -n 's/.*<MappedBlocksCount> *\([0-9]*\).*/\1/p' "$bmap")
echo "image $xz: mapped $((mapped * 4096)) bytes"
run() {
  local name=$1; shift
  rm -f "$work/target.img"
  sync
  local t0 t1
  t0=$(date +%s.%N)
  "$@" >/dev/null 2>&1
  t1=$(date +%s.%N)
  printf '%-28s %12s bytes written  %6.1f s\n' "$name" \
    "$(du -B1 "$work/target.img" | cut -f1)" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')"
}
run "picoimg flash" "$picoimg" flash "$xz" "$work/target.img"
run "picoimg flash --no-verify" "$picoimg" flash --no-verify "$xz" "$work/target.img"
run "bmaptool copy" bmaptool copy --bmap "$bmap" "$xz" "$work/target.img"
run "xzcat | dd bs=4M conv=fsync" sh -c "xzcat '$xz' | dd of='$work/target.img' bs=4M conv=fsync iflag=fullblock"
