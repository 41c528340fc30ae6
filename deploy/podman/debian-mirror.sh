#!/usr/bin/env bash
# Print the Debian mirror debootstrap should use: $DEBIAN_MIRROR when set, else the mirror this machine's
# apt already uses for Debian's main archive (a proxy or a local mirror works as it does for apt-get),
# else Debian's own. Reads deb822 `*.sources` files and one-line `sources.list` entries under $APT_ETC
# (default /etc/apt); security and updates archives and other vendors' repositories are passed over.
set -euo pipefail
if [[ -n ${DEBIAN_MIRROR:-} ]]; then
  echo "$DEBIAN_MIRROR"
  exit 0
fi
etc=${APT_ETC:-/etc/apt}
main_archive() {  # URIs that serve Debian's main archive (…/debian), in the order apt reads them
  shopt -s nullglob
  local files=("$etc"/sources.list.d/*.sources)
  ((${#files[@]})) && awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "${files[@]}"
  files=("$etc"/sources.list "$etc"/sources.list.d/*.list)
  ((${#files[@]})) && awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /=/ && $i !~ /\]$/) { print $i; break } }' "${files[@]}"
  return 0
}
found=$(main_archive 2>/dev/null | grep -E '^(https?|file)://' | sed 's:/*$::' | grep -E '/debian$' | head -n 1 || true)
echo "${found:-http://deb.debian.org/debian}"
