"""The chart on object storage (#20): distribution's s3/azure config, the GC CronJob reading usage from
the store, no PVC. What these render is run for real in tests/integration/test_objectstore.py and
tests/e2e/test_objectstore_*.py."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.chart.chartlib import find, render

S3 = ("clusterRegistry.storage.driver=s3", "clusterRegistry.storage.s3.bucket=b", "clusterRegistry.storage.s3.region=r",
      "clusterRegistry.storage.s3.secretName=keys")  # fmt: skip
AZURE = ("clusterRegistry.storage.driver=azure", "clusterRegistry.storage.azure.accountName=a",
         "clusterRegistry.storage.azure.container=c")  # fmt: skip


def storage(*sets: str) -> dict[str, Any]:
    config = yaml.safe_load(find(render(*sets), "ConfigMap", "-registry")["data"]["config.yml"])
    out: dict[str, Any] = config["storage"]
    return out


def gc_args(*sets: str) -> list[str]:
    out: list[str] = find(render(*sets), "CronJob", "-gc")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    return out


@pytest.mark.parametrize(
    ("sets", "flag"),
    [
        ((), "--storage-root"),
        (S3, "--object-storage"),
        ((*AZURE, "clusterRegistry.storage.azure.secretName=k"), "--object-storage"),
        (AZURE, None),  # default credentials: GC cannot list the container, usage through the API
    ],
)
def test_gc_measures_usage_where_the_registry_stores(sets: tuple[str, ...], flag: str | None) -> None:
    args = gc_args(*sets)
    got = [a for a in ("--storage-root", "--object-storage") if a in args]
    assert got == ([flag] if flag else [])
    assert args[args.index("--registry-config") + 1] == "/etc/distribution/config.yml"


def test_no_pvc_on_object_storage() -> None:
    for sets in (S3, AZURE):
        assert not [d for d in render(*sets) if d["kind"] == "PersistentVolumeClaim"]


@pytest.mark.parametrize(("root", "rendered"), [("/", ""), ("/site/", "site"), ("site/a", "site/a")])
def test_azure_root_has_no_slashes(root: str, rendered: str) -> None:
    """A root of "/" names the empty blob in the driver's health check, which Azure refuses (400)."""
    assert storage(*AZURE, f"clusterRegistry.storage.azure.rootDirectory={root}")["azure"]["rootdirectory"] == rendered


def test_azure_service_url_only_when_given() -> None:
    assert "serviceurl" not in storage(*AZURE)["azure"]
    url = "http://azurite.ns.svc:10000/devstoreaccount1"
    assert storage(*AZURE, f"clusterRegistry.storage.azure.serviceURL={url}")["azure"]["serviceurl"] == url
