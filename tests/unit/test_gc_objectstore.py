"""gc.objectstore's pure parts: the store a distribution config names (with the chart's environment
overrides) and which bucket keys are blobs."""

from __future__ import annotations

import pytest

from cluster_registry.errors import ConfigError
from cluster_registry.gc.objectstore import ObjectStore, blob_digest, from_config, revision_key

HEX = "ab" + "0" * 62


@pytest.mark.parametrize(
    ("root", "sub", "prefix"),
    [
        ("/", "blobs", "docker/registry/v2/blobs/"),
        ("", "blobs", "docker/registry/v2/blobs/"),
        ("/registry/", "blobs", "registry/docker/registry/v2/blobs/"),
        ("site-a", "repositories", "site-a/docker/registry/v2/repositories/"),
    ],
)
def test_prefix_is_the_key_distribution_writes(root: str, sub: str, prefix: str) -> None:
    assert ObjectStore("s3", {"rootdirectory": root}).prefix(sub) == prefix


@pytest.mark.parametrize(
    ("key", "digest"),
    [
        (f"p/sha256/ab/{HEX}/data", f"sha256:{HEX}"),
        (f"p/sha256/cd/{HEX}/data", None),  # the two-hex directory does not match the digest
        (f"p/sha256/ab/{HEX}/link", None),
        (f"p/sha256/ab/{HEX}", None),
        (f"q/sha256/ab/{HEX}/data", None),  # outside the prefix
        (f"p/sha256/ab/{HEX}/data/x", None),
    ],
)
def test_only_blob_data_objects_count(key: str, digest: str | None) -> None:
    assert blob_digest(key, "p/") == digest


def test_environment_overrides_the_config_as_distribution_does() -> None:
    config = {"storage": {"s3": {"bucket": "b", "region": "eu-west-1", "forcepathstyle": False}, "delete": {"enabled": True}}}
    env = {
        "REGISTRY_STORAGE_S3_ACCESSKEY": "AK",
        "REGISTRY_STORAGE_S3_SECRETKEY": "SK",
        "REGISTRY_STORAGE_S3_FORCEPATHSTYLE": "true",
        "REGISTRY_STORAGE_S3_MULTI_PART": "ignored",  # a nested key, not a driver parameter
        "REGISTRY_STORAGE_AZURE_ACCOUNTKEY": "other driver",
        "HOME": "/tmp",
    }
    store = from_config(config, env)
    assert store.driver == "s3"
    assert dict(store.params) == {"bucket": "b", "region": "eu-west-1", "forcepathstyle": True,
                                  "accesskey": "AK", "secretkey": "SK"}  # fmt: skip


def test_azure_and_filesystem() -> None:
    store = from_config({"storage": {"azure": {"accountname": "a", "container": "c"}}}, {"REGISTRY_STORAGE_AZURE_ACCOUNTKEY": "k=="})
    assert store.driver == "azure" and store.params["accountkey"] == "k=="
    with pytest.raises(ConfigError, match="no object storage driver"):
        from_config({"storage": {"filesystem": {"rootdirectory": "/var/lib/registry"}}}, {})


@pytest.mark.parametrize(
    ("key", "revision"),
    [
        (f"r/team/app/_manifests/revisions/sha256/{HEX}/link", ("team/app", f"sha256:{HEX}")),
        (f"r/a/_manifests/revisions/sha256/{HEX}/link", ("a", f"sha256:{HEX}")),
        (f"r/a/_manifests/tags/v1/current/link", None),
        (f"r/a/_layers/sha256/{HEX}/link", None),
        (f"r/_manifests/revisions/sha256/{HEX}/link", None),  # no repository name
        (f"x/a/_manifests/revisions/sha256/{HEX}/link", None),
    ],
)
def test_revision_links_name_a_manifest(key: str, revision: tuple[str, str] | None) -> None:
    assert revision_key(key, "r/") == revision
