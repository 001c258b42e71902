"""``cluster-registry preload``: early loading. Create the Artifacts of a list of images and wait
until every one is Ready (the artifact reconciler copies them).

Images come from ``--values FILE`` (``earlyLoading.images``), ``--image REF``, ``--component NS/NAME``
(the Component's ``spec.images`` and the images its status lists), and ``--chart REF`` rendered with
the real ``helm template`` (``--chart-values FILE`` ...; every workload's images, through
:mod:`cluster_registry.workloads`). Progress (n of N, bytes) is logged as it changes. A Deferred
Artifact (the GC write lock is held) is waited on, not failed.

With ``--record-component NAME`` the images of ``--values``/``--image``/``--chart`` are first recorded
in the Component NAME of ``--namespace``, owned by the release's ConfigMap NAME, and their Artifacts
are created as that Component's dependents: GC keeps them while the Component lists them (however long
before the workload deploys), the component reconciler drops an image removed from the list, and
deleting the ConfigMap (early loading switched off, the release uninstalled) deletes the Component.

Exit codes: 0 every image Ready; 1 timeout (each image not Ready is listed with why) or an image
that cannot be loaded; 2 usage.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click
import yaml
from kubernetes import client
from kubernetes.client import ApiException

from cluster_registry import api, kube, reference, workloads
from cluster_registry.errors import ConfigError, InvalidReferenceError
from cluster_registry.install import artifacts as A
from cluster_registry.install import progress as P
from cluster_registry.install import values as V
from cluster_registry.units import parse_duration

log = logging.getLogger(__name__)


def values_images(path: str) -> tuple[list[str], str | None]:
    """``earlyLoading.images`` and ``earlyLoading.timeout`` of a values file."""
    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read values file {path}: {err}") from None
    values, problems = V.load(document)
    for p in problems:
        if p.key == V.K_EARLY_IMAGES:
            raise ConfigError(f"{path}: {V.PREFIX}{p.key} {p.message}")
    timeout = (V.subtree(document).get("earlyLoading") or {}).get("timeout")
    return list(values.early_loading_images), str(timeout) if timeout else None


def chart_images(helm: str, chart: str, version: str | None, values_files: Iterable[str], namespace: str) -> list[str]:
    """The images of every workload ``helm template`` renders from ``chart``."""
    cmd = [helm, "template", "preload", chart, "--namespace", namespace]
    if version:
        cmd += ["--version", version]
    for f in values_files:
        cmd += ["--values", f]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigError(f"cannot run {helm} template: {err}") from None
    if out.returncode != 0:
        last = [ln for ln in out.stderr.splitlines() if ln.strip()][-1:] or ["failed"]
        raise ConfigError(f"helm template {chart}: {last[0][:500]}")
    return workloads.images(workloads.load_manifests(out.stdout))


def component_images(custom: Any, namespace: str, name: str) -> tuple[list[str], dict[str, Any]]:
    obj = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.COMPONENTS, name)
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    listed = [i for i in spec.get("images") or [] if isinstance(i, str)]
    listed += [s["sourceArtifact"] for s in status.get("images") or [] if isinstance(s, dict) and s.get("sourceArtifact")]
    return listed, obj


def recorded_component(
    name: str, namespace: str, sources: Iterable[str], owner_uid: str, pull_secrets: Iterable[str] = ()
) -> dict[str, Any]:
    """The Component that records early-loaded images, owned by the release's ConfigMap of the same name."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": "Component",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {api.LABEL_MANAGED_BY: api.MANAGED_BY, api.LABEL_LOADED_BY: "preload"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": name, "uid": owner_uid}],
        },
        "spec": {"images": list(dict.fromkeys(sources)), "pullSecrets": sorted(set(pull_secrets))},
    }


def record_component(
    core: Any, custom: Any, name: str, namespace: str, sources: Iterable[str], pull_secrets: Iterable[str] = ()
) -> dict[str, Any]:
    """Create the recording Component, or set its images and owner; returns the object."""
    try:
        owner = core.read_namespaced_config_map(name, namespace)
    except ApiException as err:
        if err.status == 404:
            raise ConfigError(f"ConfigMap {namespace}/{name} (the release's record of early loading) does not exist") from None
        raise
    body = recorded_component(name, namespace, sources, owner.metadata.uid, pull_secrets)
    try:
        created: dict[str, Any] = custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.COMPONENTS, body)
        return created
    except ApiException as err:
        if err.status != 409:
            raise
    meta = body["metadata"]
    patch = {"metadata": {"labels": meta["labels"], "ownerReferences": meta["ownerReferences"]}, "spec": body["spec"]}
    patched: dict[str, Any] = custom.patch_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.COMPONENTS, name, patch)
    return patched


def normalise(images: Iterable[tuple[str, str, str]]) -> list[P.Wanted]:
    """(image, namespace, origin) -> distinct Wanted, first-seen order; raises ConfigError listing bad ones."""
    out: dict[tuple[str, str], P.Wanted] = {}
    bad: list[str] = []
    for image, namespace, origin in images:
        try:
            source = reference.normalize(image)
        except InvalidReferenceError as err:
            bad.append(f"{err} (from {origin})")
            continue
        out.setdefault((namespace, source), P.Wanted(source, namespace, origin))
    if bad:
        raise ConfigError("cannot preload: " + "; ".join(bad))
    return list(out.values())


def wait(
    wanted: list[P.Wanted],
    read: Callable[[], dict[tuple[str, str], dict[str, Any]]],
    *,
    timeout: float,
    poll: float,
    fail_fast: bool,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> P.Summary:
    """Poll until every wanted image is Ready, the deadline passes, or (``fail_fast``) one Failed."""
    deadline = clock() + timeout
    last = ""
    while True:
        summary = P.summarize(wanted, read())
        line = summary.line()
        if line != last:
            log.info("preload: %s", line, extra={"ready": summary.ready, "total": summary.total, "bytes": summary.bytes_ready})
            last = line
        if summary.done or (fail_fast and summary.failed) or clock() >= deadline:
            return summary
        sleep(min(poll, max(0.0, deadline - clock())))


@click.command("preload")
@click.option("--values", "values_file", default=None, type=click.Path(dir_okay=False), help="values with earlyLoading.images (the chart's rendered values)")
@click.option("--image", "images", multiple=True, help="an image to preload (repeatable)")
@click.option("--component", "components", multiple=True, help="NS/NAME of a Component whose images to preload (repeatable)")
@click.option("--chart", "charts", multiple=True, help="a Helm chart (oci://, repo/chart, path) whose workload images to preload (repeatable)")
@click.option("--chart-version", default=None, help="version of --chart")
@click.option("--chart-values", multiple=True, type=click.Path(dir_okay=False), help="values file for --chart (repeatable)")
@click.option("--namespace", default=None, envvar="POD_NAMESPACE", help="namespace of the Artifacts (default: the pod's, else default)")
@click.option("--record-component", "record", default=None,
              help="record the images (not --component's) in this Component of --namespace, owned by the ConfigMap of the same name; GC keeps them while it lists them")  # fmt: skip
@click.option("--pull-secret", "pull_secrets", multiple=True, help="Secret (in --namespace) to pull the images with (repeatable)")
@click.option("--kubeconfig", default=None, type=click.Path(dir_okay=False))
@click.option("--timeout", default=None, help="how long to wait for every image to be Ready (default: earlyLoading.timeout, else 30m)")
@click.option("--poll", default=2.0, show_default=True, type=float, help="seconds between status reads")
@click.option("--fail-fast", is_flag=True, help="stop at the first Failed Artifact instead of waiting for a retry")
@click.option("--helm", default="helm", show_default=True, help="the helm binary for --chart")
@click.option("--dry-run", is_flag=True, help="list the images that would be preloaded; change nothing")
def preload(
    values_file: str | None,
    images: tuple[str, ...],
    components: tuple[str, ...],
    charts: tuple[str, ...],
    chart_version: str | None,
    chart_values: tuple[str, ...],
    namespace: str | None,
    record: str | None,
    pull_secrets: tuple[str, ...],
    kubeconfig: str | None,
    timeout: str | None,
    poll: float,
    fail_fast: bool,
    helm: str,
    dry_run: bool,
) -> None:
    """Preload images into the cluster registry and wait until all are Ready."""
    ns = namespace or kube.pod_namespace("default")
    listed: list[tuple[str, str, str]] = [(i, ns, "--image") for i in images]
    try:
        timeout_text = timeout
        if values_file:
            from_values, values_timeout = values_images(values_file)
            listed += [(i, ns, "earlyLoading.images") for i in from_values]
            timeout_text = timeout_text or values_timeout
        timeout_s = parse_duration(timeout_text or "30m")
        for chart in charts:
            found = chart_images(helm, chart, chart_version, chart_values, ns)
            log.info("chart %s: %d images", chart, len(found))
            listed += [(i, ns, f"chart {chart}") for i in found]
    except (ConfigError, ValueError) as err:
        click.echo(f"preload: {err}", err=True)
        sys.exit(2 if isinstance(err, ValueError) else 1)

    custom: Any = None
    component_objs: dict[tuple[str, str], dict[str, Any]] = {}
    if components or not dry_run:
        custom = client.CustomObjectsApi(kube.api_client(kubeconfig))
    for text in components:
        comp_ns, _, comp_name = text.rpartition("/")
        comp_ns = comp_ns or ns
        try:
            found, obj = component_images(custom, comp_ns, comp_name)
        except ApiException as err:
            click.echo(f"preload: cannot read Component {comp_ns}/{comp_name}: HTTP {err.status} {err.reason}", err=True)
            sys.exit(1)
        component_objs[(comp_ns, comp_name)] = obj
        listed += [(i, comp_ns, f"component {comp_ns}/{comp_name}") for i in found]
    try:
        wanted = normalise(listed)
    except ConfigError as err:
        click.echo(f"preload: {err}", err=True)
        sys.exit(1)
    if record:
        recorded = [w.source for w in wanted if not w.origin.startswith("component ")]
        if dry_run:
            click.echo(f"would record {len(recorded)} images in Component {ns}/{record}")
        else:
            try:
                obj = record_component(client.CoreV1Api(custom.api_client), custom, record, ns, recorded, pull_secrets)
            except (ApiException, ConfigError) as err:
                why = f"HTTP {err.status} {err.reason}" if isinstance(err, ApiException) else str(err)
                click.echo(f"preload: cannot record the images in Component {ns}/{record}: {why}", err=True)
                sys.exit(1)
            component_objs[(ns, record)] = obj
            origin = f"component {ns}/{record}"
            wanted = [w if w.origin.startswith("component ") else P.Wanted(w.source, w.namespace, origin) for w in wanted]
            log.info("preload: recorded %d images in Component %s/%s", len(recorded), ns, record)
    if not wanted:
        click.echo("preload: no images to preload")
        return
    if dry_run:
        for w in wanted:
            click.echo(f"would preload {w.source} as Artifact {w.namespace}/{w.artifact} (from {w.origin})")
        return

    try:
        _ensure_all(custom, wanted, component_objs, ns, pull_secrets)
        namespaces = sorted({w.namespace for w in wanted})

        last: dict[tuple[str, str], dict[str, Any]] = {}

        def read() -> dict[tuple[str, str], dict[str, Any]]:
            nonlocal last
            out: dict[tuple[str, str], dict[str, Any]] = {}
            try:
                for n in namespaces:
                    listing = custom.list_namespaced_custom_object(api.GROUP, api.VERSION, n, api.ARTIFACTS)
                    for item in listing.get("items") or []:
                        out[(n, item["metadata"]["name"])] = item
            except ApiException as err:  # a blip of the API server: keep the last view, poll again
                log.warning("preload: cannot list Artifacts (HTTP %s %s); retrying", err.status, err.reason)
                return last
            last = out
            return out

        log.info("preload: %d Artifacts created or found; waiting up to %.0fs for them to be Ready", len(wanted), timeout_s)
        summary = wait(wanted, read, timeout=timeout_s, poll=poll, fail_fast=fail_fast)
    except ApiException as err:
        click.echo(f"preload: Kubernetes API error: HTTP {err.status} {err.reason}: {(err.body or '')[:300]}", err=True)
        sys.exit(1)
    if summary.done:
        click.echo(f"preload: {summary.line()}")
        return
    why = "an Artifact Failed" if fail_fast and summary.failed else f"timed out after {timeout_text or '30m'}"
    click.echo(f"preload: {why}: {summary.line()}", err=True)
    for line in summary.not_ready_report():
        click.echo(line, err=True)
    sys.exit(1)


def _ensure_all(
    custom: Any,
    wanted: list[P.Wanted],
    component_objs: dict[tuple[str, str], dict[str, Any]],
    ns: str,
    pull_secrets: tuple[str, ...],
) -> None:
    for w in wanted:
        labels: dict[str, str] = {A.LABEL_LOADED_BY: "preload"}
        owners: list[api.OwnerRef] = []
        if w.origin.startswith("component "):
            comp_ns, _, comp_name = w.origin.removeprefix("component ").partition("/")
            comp = component_objs[(comp_ns, comp_name)]
            labels[A.LABEL_COMPONENT] = comp_name
            owners = [api.component_ref(comp_name, comp["metadata"]["uid"])]
        secrets = pull_secrets if w.namespace == ns else ()
        A.ensure(custom, api.artifact_body(w.source, w.namespace, pull_secrets=secrets, labels=labels, owner_references=owners))
