"""`helm test`: proves an install works from inside the cluster, with the standard library and PyYAML (both in the image).

1. The token service gives the artifact reconciler's credential a push token; distribution (auth: token)
   takes the push and serves the image back with it, byte for byte; without a token it refuses. No
   Artifact names the probe image, so GC deletes it.
2. An anonymous caller (its token asked for without credentials) is refused the probe image with
   `registryAccess.mode: isolated` ($REGISTRY_ACCESS) and served it with `shared`.
3. The webhook (when it runs in the cluster) answers an AdmissionReview over the chart's TLS chain.

Arguments: REGISTRY_URL CREDENTIALS_FILE REPOSITORY TOKEN_URL [WEBHOOK_URL CA_FILE]. Prints one JSON line.
With registryTLS the registry's URL and TOKEN_URL are https: $SSL_CERT_FILE (the chart's CA) is the trust.
"""

import hashlib
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
import uuid
from base64 import b64encode

import yaml


def request(method, url, body=None, headers=None, context=None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as r:
            return r.status, r.headers, r.read()  # case-insensitive: Go sends "Www-Authenticate"
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def expect(what, status, want, body):
    if status not in want:
        sys.exit(f"helm-test: {what}: HTTP {status}, want {want}: {body[:300]!r}")


def credentials(path):
    """A push credential (credentials.yaml: username, password) as a Basic header."""
    with open(path) as f:
        doc = yaml.safe_load(f)
    return "Basic " + b64encode(f"{doc['username']}:{doc['password']}".encode()).decode()


def bearer(token_url, basic, repo):
    """A push-and-pull token for REPO from the token service (the realm, as pods reach it)."""
    status, _, body = request("GET", f"{token_url}?service=cluster-registry&scope=repository:{repo}:pull,push",
                              None, {"Authorization": basic})
    expect("get a push token", status, (200,), body)
    return "Bearer " + json.loads(body)["token"]


def anonymous_pull(base, digest, token_url, repo, access):
    """What an anonymous caller gets for the probe image at BASE: "refused" (isolated) or "served" (shared)."""
    status, _, body = request("GET", f"{token_url}?service=cluster-registry&scope=repository:{repo}:pull")
    headers = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    if status == 200:  # isolated: a token with no grant, or none at all
        headers["Authorization"] = "Bearer " + json.loads(body)["token"]
    status, _, body = request("GET", f"{base}/manifests/{digest}", None, headers)
    expect(f"anonymous pull, {access} access", status, (200,) if access == "shared" else (401, 403), body)
    return "served" if access == "shared" else "refused"


def push_and_pull(registry, basic, repo, token_url):
    base = f"{registry}/v2/{repo}"
    status, headers, body = request("GET", f"{base}/tags/list")
    expect("anonymous request without a token", status, (401,), body)
    if "realm=" not in headers.get("WWW-Authenticate", "").lower():
        sys.exit(f"helm-test: the registry does not name a token realm: {headers.get('WWW-Authenticate')!r}")
    auth = bearer(token_url, basic, repo)
    layer = f"cluster-registry helm test {uuid.uuid4()}\n".encode()
    config = b"{}"
    for blob in (layer, config):
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        status, headers, body = request("POST", f"{base}/blobs/uploads/", b"", {"Authorization": auth})
        expect("start upload", status, (202,), body)
        location = headers["Location"]
        location = location if location.startswith("http") else f"{registry}{location}"
        sep = "&" if "?" in location else "?"
        status, _, body = request("PUT", f"{location}{sep}digest={digest}", blob,
                                  {"Authorization": auth, "Content-Type": "application/octet-stream"})
        expect("upload blob", status, (201,), body)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": len(config),
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": len(layer),
                    "digest": "sha256:" + hashlib.sha256(layer).hexdigest()}],
    }, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    status, _, body = request("PUT", f"{base}/manifests/probe", manifest,
                              {"Authorization": auth, "Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    expect("push manifest", status, (201,), body)
    status, _, body = request("GET", f"{base}/manifests/{digest}", None,
                              {"Accept": "application/vnd.oci.image.manifest.v1+json", "Authorization": auth})
    expect("pull manifest", status, (200,), body)
    if body != manifest:
        sys.exit("helm-test: the registry served a different manifest than was pushed")
    status, _, body = request("GET", f"{base}/blobs/sha256:{hashlib.sha256(layer).hexdigest()}", None,
                              {"Authorization": auth})
    expect("pull layer", status, (200,), body)
    if body != layer:
        sys.exit("helm-test: the registry served a different layer than was pushed")
    return digest, anonymous_pull(base, digest, token_url, repo, os.environ.get("REGISTRY_ACCESS", "isolated"))


def admission(url, ca_file):
    uid = str(uuid.uuid4())
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "cluster-registry-helm-test", "operation": "CREATE", "userInfo": {"username": "helm-test"},
        "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": "cluster-registry-helm-test"},
                   "spec": {"containers": [{"name": "probe", "image": "docker.io/library/busybox:1.36"}]}},
    }}
    context = ssl.create_default_context(cafile=ca_file)
    status, _, body = request("POST", url, json.dumps(review).encode(), {"Content-Type": "application/json"}, context)
    expect("AdmissionReview", status, (200,), body)
    answer = json.loads(body)["response"]
    if answer.get("uid") != uid or answer.get("allowed") is not True:
        sys.exit(f"helm-test: the webhook's answer does not admit the probe pod: {answer}")
    return True


def main(argv):
    registry, creds, repo, token_url = argv[:4]
    digest, anonymous = push_and_pull(registry, credentials(creds), repo, token_url)
    report = {"pushedAndPulled": digest, "anonymousPull": anonymous}
    if len(argv) == 6:
        report["webhookAdmitted"] = admission(argv[4], argv[5])
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
