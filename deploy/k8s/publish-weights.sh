#!/usr/bin/env bash
# Publish new weights to the simplenn-weights volume, the way every serving pod can hot-reload safely:
# copy them under a temporary (hidden, *.tmp) name on the volume, check the copy's sha256, then rename
# it into place. A rename is atomic on one filesystem, so a pod sees the old file or the new one, never
# half of one; each pod notices the change on its own and swaps models without dropping a request.
#
#   deploy/k8s/publish-weights.sh [-n NAMESPACE] [--image IMAGE] model.pth
#       replaces /weights/model.pth
#   deploy/k8s/publish-weights.sh [-n NAMESPACE] [--image IMAGE] --version 7 model.pth
#       adds the version directory /weights/7/ (model.pth + model.pth.sha256), written as /weights/.7.tmp/
#       and renamed; the highest number is served. Once numbered directories exist, loose files in
#       /weights are ignored, so stay with one layout. Roll back by removing the newest directory.
#
# It starts a short-lived pod from the serving image (it has sh, tar and sha256sum) that mounts the claim
# read-write, copies with `kubectl cp`, renames with `kubectl exec`, and deletes the pod. The files it
# writes belong to uid/gid 10001 (the server's user) and are world-readable. Where the volume is also
# mounted outside the cluster (an NFS export, say), publish there the same way: write a temporary name
# in the same directory, then `mv` it into place.
set -euo pipefail

namespace=simplenn
claim=simplenn-weights
image=""
version=""
kubectl="${KUBECTL:-kubectl}"

usage() { sed -n '7,11p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        -n|--namespace) namespace="$2"; shift 2 ;;
        --image) image="$2"; shift 2 ;;
        --claim) claim="$2"; shift 2 ;;
        --version) version="$2"; shift 2 ;;
        -h|--help) usage ;;
        -*) echo "unknown option: $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -eq 1 ] || usage
file="$1"
[ -f "$file" ] && [ -s "$file" ] || { echo "not a non-empty file: $file" >&2; exit 2; }
if [ -n "$version" ] && ! [[ "$version" =~ ^[0-9]+$ ]]; then
    echo "--version must be a number, not '$version'" >&2; exit 2
fi
digest="$(sha256sum "$file" | cut -d' ' -f1)"
k() { "$kubectl" --namespace "$namespace" "$@"; }

if [ -z "$image" ]; then
    image="$(k get deployment simplenn-serve -o jsonpath='{.spec.template.spec.containers[0].image}')"
fi
pod="simplenn-weights-publisher-$(date +%s)"
overrides="$(cat <<JSON
{
  "apiVersion": "v1",
  "spec": {
    "automountServiceAccountToken": false,
    "securityContext": {"runAsNonRoot": true, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [{
      "name": "publisher", "image": "$image", "command": ["/bin/sleep", "900"],
      "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                          "capabilities": {"drop": ["ALL"]}},
      "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}},
      "volumeMounts": [{"name": "weights", "mountPath": "/weights"}, {"name": "tmp", "mountPath": "/tmp"}]
    }],
    "volumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": "$claim"}},
                {"name": "tmp", "emptyDir": {}}]
  }
}
JSON
)"

echo "publish-weights: starting $pod in $namespace (image $image)" >&2
k run "$pod" --image "$image" --restart Never --labels app.kubernetes.io/name=simplenn-weights-publisher \
    --overrides "$overrides" >/dev/null
trap 'k delete pod "$pod" --wait=false >/dev/null 2>&1 || true' EXIT
k wait --for condition=Ready "pod/$pod" --timeout 180s >/dev/null

# The copy lands under a temporary name that the server never serves; it is renamed only once its
# digest is checked. `umask 022`: readable by the server whatever uid it runs as.
if [ -z "$version" ]; then
    tmp=/weights/.model.pth.$$.tmp
    k cp "$file" "$pod:$tmp" -c publisher
    k exec "$pod" -c publisher -- sh -ec "
        umask 022; chmod 0644 '$tmp'
        echo '$digest  $tmp' | sha256sum -c --quiet -
        mv -f '$tmp' /weights/model.pth"
    echo "publish-weights: /weights/model.pth is now version ${digest:0:12}" >&2
else
    tmp=/weights/.$version.tmp
    k exec "$pod" -c publisher -- sh -ec "umask 022; test ! -e /weights/$version; rm -rf '$tmp'; mkdir -m 0755 '$tmp'"
    k cp "$file" "$pod:$tmp/model.pth" -c publisher
    k exec "$pod" -c publisher -- sh -ec "
        umask 022; chmod 0644 '$tmp/model.pth'
        echo '$digest  $tmp/model.pth' | sha256sum -c --quiet -
        echo '$digest  model.pth' > '$tmp/model.pth.sha256'
        test ! -e /weights/$version
        mv '$tmp' /weights/$version"
    echo "publish-weights: /weights/$version/model.pth is version ${digest:0:12}" >&2
fi
