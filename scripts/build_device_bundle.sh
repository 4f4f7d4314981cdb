#!/usr/bin/env bash
# Build the wheel bundle that the lent GPU machine needs to run fairseq.
#
#   bash scripts/build_device_bundle.sh          # writes .whl/ (ignored) and .whl/MANIFEST.txt
#
# The GPU machine has no network. Its Python 3.12 has torch 2.11.0, triton, numpy 2.5.2,
# sacrebleu, tensorboard, pytest and the packages docs/gpu.md lists (PyYAML, tqdm, scipy,
# scikit-learn, torchaudio, ...), but not fairseq nor fairseq's configuration stack. This script
# fetches those for cp312 / manylinux x86_64 into .whl/, which the device tool carries
# (`carry: [".whl"]`) and scripts/gpu_check.sh installs there with
# `pip install --no-index --no-deps --target ...`. What goes in was settled by rehearsing on a
# replica of the device (scripts/rehearse_device.sh), not by reading requirements.
#
# Idempotent: when MANIFEST.txt matches the list below and every wheel's checksum, it only
# prints the manifest. It fails (exit 1) when the bundle would exceed 40 MB, so that it fits
# the device tool's 64 MiB carry beside the working tree.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
dest="$root/.whl"
manifest="$dest/MANIFEST.txt"
limit_bytes=$((40 * 1000 * 1000))
py="${PYTHON:-python3}"
say() { echo "[bundle] $*" >&2; }
die() { say "error: $*"; exit 1; }

# name==version, module that proves it is importable, role. "needed": the device lacks it.
# "fallback": the device had it when last read (docs/gpu.md); carried because it is small and
# fairseq cannot import without it, and installed there only if the import fails.
specs=(
  "fairseq-fixed==0.12.3.1 fairseq needed"
  "hydra-core==1.3.2 hydra needed"
  "omegaconf==2.3.0 omegaconf needed"
  "antlr4-python3-runtime==4.9.3 antlr4 needed"
  "bitarray==3.12.3 bitarray needed"
  "PyYAML==6.0.4 yaml fallback"
  "tqdm==4.70.1 tqdm fallback"
)
# antlr4-python3-runtime 4.9.3 (the one omegaconf 2.3 is written for) exists only as an sdist.
build_from_sdist="antlr4-python3-runtime"
want="$(printf '%s\n' "${specs[@]}" | sha256sum | cut -d' ' -f1)"

# Wheel file names normalise the distribution name: lower case, '-' and '.' to '_'.
wheel_prefix() { echo "$1" | tr 'A-Z.-' 'a-z__'; }
find_wheel() {  # find_wheel NAME VERSION -> the wheel's path, if present
  local prefix
  prefix="$(wheel_prefix "$1")"
  find "$dest" -maxdepth 1 -iname "${prefix}-${2}-*.whl" | head -1
}

manifest_ok() {
  [ -f "$manifest" ] || return 1
  [ "$(sed -n 's/^# specs sha256 //p' "$manifest")" = "$want" ] || return 1
  local file sha
  while read -r _ _ _ sha file _ _; do
    [ -f "$dest/$file" ] || return 1
    [ "$(sha256sum "$dest/$file" | cut -d' ' -f1)" = "$sha" ] || return 1
  done < <(grep -v '^#' "$manifest")
}

if manifest_ok; then
  say "bundle up to date: $manifest"
  cat "$manifest"
  exit 0
fi

"$py" -m pip --version > /dev/null 2>&1 || die "$py has no pip: set PYTHON to a Python 3 with pip"
mkdir -p "$dest"
# pip picks manylinux tags by exact name: list the ones a glibc 2.28+ machine accepts (the
# device's torch 2.11 wheels are manylinux_2_28 themselves, so its glibc is at least that).
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
pip_q=("$py" -m pip --disable-pip-version-check -q)

for spec in "${specs[@]}"; do
  read -r req _ _ <<< "$spec"
  name="${req%%==*}" version="${req##*==}"
  if [ -n "$(find_wheel "$name" "$version")" ]; then
    say "have $(basename "$(find_wheel "$name" "$version")")"
    continue
  fi
  if [ "$name" = "$build_from_sdist" ]; then
    say "building a wheel of $req from its sdist"
    "${pip_q[@]}" wheel --no-deps --no-binary "$name" -w "$dest" "$req" \
      || die "could not build $req (network? setuptools?); rerun to retry"
  else
    say "downloading $req for cp312 manylinux x86_64"
    "${pip_q[@]}" download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$dest" "$req" \
      || die "could not download $req for cp312 (network? version withdrawn?); rerun to retry"
  fi
  [ -n "$(find_wheel "$name" "$version")" ] || die "$req: pip reported success but no $(wheel_prefix "$name")-$version-*.whl is in $dest"
done

# One version of each and nothing else: a second version of a package stops pip's install.
expected=()
for spec in "${specs[@]}"; do
  read -r req _ _ <<< "$spec"
  expected+=("$(basename "$(find_wheel "${req%%==*}" "${req##*==}")")")
done
for file in "$dest"/*; do
  base="$(basename "$file")"
  [ "$base" = MANIFEST.txt ] && continue
  if ! printf '%s\n' "${expected[@]}" | grep -qxF "$base"; then
    say "removing $base (not in the bundle's list)"
    rm -rf "$file"
  fi
done

tmp="$manifest.tmp"
{
  echo "# fairseq-smoe device bundle, built $(date -u +%FT%TZ) by scripts/build_device_bundle.sh"
  echo "# specs sha256 $want"
  echo "# name version bytes sha256 file module role"
} > "$tmp"
total=0
for spec in "${specs[@]}"; do
  read -r req module role <<< "$spec"
  name="${req%%==*}" version="${req##*==}"
  path="$(find_wheel "$name" "$version")"
  base="$(basename "$path")"
  # Every wheel must install on cp312 linux x86_64: pure Python or built for exactly that.
  case "$base" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp312-cp312-*manylinux*x86_64*.whl|*-abi3-*manylinux*x86_64*.whl) ;;
    *) die "$base does not install on cp312 manylinux x86_64" ;;
  esac
  bytes=$(stat -c %s "$path")
  total=$((total + bytes))
  echo "$name $version $bytes $(sha256sum "$path" | cut -d' ' -f1) $base $module $role" >> "$tmp"
done
echo "# total bytes $total" >> "$tmp"
mv "$tmp" "$manifest"
cat "$manifest"
say "bundle: ${#specs[@]} wheels, $total bytes ($(awk "BEGIN{printf \"%.1f\", $total/1e6}") MB) in $dest"
if [ "$total" -gt "$limit_bytes" ]; then
  die "the bundle is $total bytes, over the 40 MB budget (the device tool carries 64 MiB with the working tree)"
fi
