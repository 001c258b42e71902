"""The pure validation core: every rule, table-driven, with the message text an operator sees."""

from __future__ import annotations

from typing import Any

import pytest

from cluster_registry.install import checks as C
from cluster_registry.install import values as V
from cluster_registry.install.cron import cron_error
from cluster_registry.units import parse_quantity

SYS = {"kubernetes.azure.com/mode": "system"}


def nodes(ready: int, *, not_ready: int = 0, cordoned: int = 0, other_pool: int = 0) -> tuple[C.Node, ...]:
    out = [C.Node(f"sys-{i}", SYS, True, True) for i in range(ready)]
    out += [C.Node(f"down-{i}", SYS, False, True) for i in range(not_ready)]
    out += [C.Node(f"cordoned-{i}", SYS, True, False) for i in range(cordoned)]
    out += [C.Node(f"user-{i}", {"kubernetes.azure.com/mode": "user"}, True, True) for i in range(other_pool)]
    return tuple(out)


AZFILE = C.StorageClass("azurefile", "file.csi.azure.com", is_default=False)
AZDISK = C.StorageClass("managed-csi", "disk.csi.azure.com", is_default=True)
LOCAL = C.StorageClass("standard", "rancher.io/local-path", is_default=True)
WEIRD = C.StorageClass("weird", "example.com/unknown", is_default=True)
CEPHFS = C.StorageClass("cephfs", "rook-ceph.cephfs.csi.ceph.com")

GOOD = C.Facts(
    kubernetes_version=(1, 31),
    nodes=nodes(3),
    storage_classes=(AZFILE, AZDISK),
)


def vals(**tree: Any) -> dict[str, Any]:
    """Build a values tree from dotted keys: vals(**{"a.b": 1}) -> {"a": {"b": 1}}."""
    out: dict[str, Any] = {}
    for dotted, value in tree.items():
        node = out
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def run(tree: dict[str, Any], facts: C.Facts = GOOD) -> list[C.Problem]:
    values, problems = V.load(tree)
    return C.run(values, facts, problems)


HA_RWX = {"clusterRegistry.storageClassName": "azurefile"}
REG_HA_OFF = {"clusterRegistry.highAvailability.enabled": False, "clusterRegistry.autoScaling.enabled": False}

# (id, values, facts, [(check, severity, substrings...)]). Value combinations are _validate.tpl's and types
# the schema's (tests/chart); the values' own problems are check "values", the rest facts about the cluster.
CASES: list[tuple[str, dict[str, Any], C.Facts, list[tuple[str, C.Severity, tuple[str, ...]]]]] = [
    ("defaults-good-cluster-ha-rwx", vals(**HA_RWX), GOOD, []),
    (
        "bad-early-image",
        vals(enableEarlyLoading=True, **{"earlyLoading.images": ["ok:1", "Bad Ref"]}, **HA_RWX),
        GOOD,
        [("values", C.Severity.ERROR, ("'Bad Ref'",))],
    ),
    ("early-loading-switch-alone-is-valid-aosm", vals(enableEarlyLoading=True, **HA_RWX), GOOD, []),
    (
        "ha-two-nodes",
        vals(**HA_RWX),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(2, not_ready=1, cordoned=1, other_pool=5), storage_classes=(AZFILE,)),
        [
            (
                "ha-nodes",
                C.Severity.ERROR,
                (
                    "at least 3 schedulable, Ready system-pool nodes",
                    "2 of the 4 nodes with that label are",
                    "cordoned-0, down-0 not Ready or not schedulable",
                    "validation.allowHighAvailabilityOnFewerNodes",
                ),
            )
        ],
    ),
    (
        "ha-one-node-override",
        vals(**{"validation.allowHighAvailabilityOnFewerNodes": True}, **HA_RWX),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(1), storage_classes=(AZFILE,)),
        [("ha-nodes", C.Severity.WARNING, ("accepted: the override is set", "1 of the 1 nodes"))],
    ),
    (
        "ha-off-one-node-fine",
        vals(
            **{
                "clusterRegistry.highAvailability.enabled": False,
                "clusterRegistry.autoScaling.enabled": False,
                "webhook.highAvailability.enabled": False,
                "webhook.autoScaling.enabled": False,
            }
        ),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(1), storage_classes=(LOCAL,)),
        [],
    ),
    (
        "custom-pool-label",
        vals(**{"systemPool.nodeLabel": "agentpool=sys"}, **HA_RWX),
        GOOD,  # the three nodes carry the AKS label, not agentpool=sys
        [("ha-nodes", C.Severity.ERROR, ("label agentpool=sys", "0 of the 0 nodes"))],
    ),
    (
        "named-class-missing",
        vals(**{"clusterRegistry.storageClassName": "nexus-shared"}),
        GOOD,
        [("storage-class", C.Severity.ERROR, ("storage class 'nexus-shared' does not exist", "azurefile, managed-csi"))],
    ),
    (
        "no-default-class",
        vals(**REG_HA_OFF),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(AZFILE,)),
        [("storage-class", C.Severity.ERROR, ("no default storage class",))],
    ),
    (
        "two-default-classes",
        vals(**REG_HA_OFF),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(AZDISK, LOCAL)),
        [("storage-class", C.Severity.WARNING, ("managed-csi, standard",))],
    ),
    (
        "ha-default-class-rwo-only",
        vals(),
        GOOD,  # default class is Azure Disk
        [("storage-access-mode", C.Severity.ERROR, ("'managed-csi' (provisioner disk.csi.azure.com) gives only ReadWriteOnce",))],
    ),
    (
        "ha-cephfs-rwx",
        vals(**{"clusterRegistry.storageClassName": "cephfs"}),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(CEPHFS,)),
        [],
    ),
    (
        "ha-unknown-provisioner-warns",
        vals(),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(WEIRD,)),
        [("storage-access-mode", C.Severity.WARNING, ("cannot tell whether storage class 'weird'", "storageAccessMode"))],
    ),
    (
        "ha-declared-rwx-trusted",
        vals(**{"clusterRegistry.storageAccessMode": "ReadWriteMany"}),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(LOCAL,)),
        [],
    ),
    (
        "object-storage-skips-volume-checks",
        vals(**{"clusterRegistry.storage.driver": "s3"}),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=()),
        [],
    ),
    (
        "storage-size-changed",
        vals(**{"clusterRegistry.storageSize": "200Gi"}, **HA_RWX),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(AZFILE,), volume=C.Volume("r-registry", "azurefile", "100Gi")),
        [
            (
                "storage-immutable",
                C.Severity.ERROR,
                ("storageSize cannot be modified after the initial deployment", "r-registry is 100Gi", "new value is 200Gi", "back to 100Gi"),
            )
        ],
    ),
    (
        "storage-size-same-quantity-other-unit",
        vals(**{"clusterRegistry.storageSize": "102400Mi"}, **HA_RWX),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(AZFILE,), volume=C.Volume("r-registry", "azurefile", "100Gi")),
        [],
    ),
    (
        "storage-class-changed",
        vals(**{"clusterRegistry.storageClassName": "cephfs"}),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(AZFILE, CEPHFS), volume=C.Volume("r-registry", "azurefile", "100Gi")),
        [("storage-immutable", C.Severity.ERROR, ("storageClassName cannot be modified", "uses 'azurefile'", "back to 'azurefile'"))],
    ),
    (
        "existing-claim-missing",
        vals(**{"clusterRegistry.existingClaim": "data"}),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(), volume=C.Volume("data", "", "", exists=False)),
        [("existing-claim", C.Severity.ERROR, ("existingClaim 'data' does not exist",))],
    ),
    (
        "existing-claim-rwo-with-ha",
        vals(**{"clusterRegistry.existingClaim": "data"}),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(), volume=C.Volume("data", "x", "1Gi", ("ReadWriteOnce",))),
        [("existing-claim", C.Severity.ERROR, ("access modes ReadWriteOnce",))],
    ),
    (
        "bad-cron",
        vals(**{"clusterRegistry.clusterRegistryGCCadence": "0 25 * * *"}, **HA_RWX),
        GOOD,
        [("values", C.Severity.ERROR, ("'0 25 * * *' is not a valid cron schedule", "hour field '25'"))],
    ),
    ("empty-cron-disables-gc", vals(**{"clusterRegistry.clusterRegistryGCCadence": ""}, **HA_RWX), GOOD, []),
    (
        "bad-pull-credential-rotation",
        vals(**{"registryAccess.pullCredentialRotation": "weekly"}, **HA_RWX),
        GOOD,
        [("values", C.Severity.ERROR, ("'weekly' is not a valid cron schedule", "expected 5 fields"))],
    ),
    (
        "cel-rejected",
        vals(**{"webhook.pod.mutation.matchConditionExpression": "request.nope("}, **HA_RWX),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(AZFILE,), match_condition_error="compilation failed: ERROR: <input>:1:14: Syntax error"),
        [("match-condition", C.Severity.ERROR, ("the API server rejects the webhook match condition: compilation failed",))],
    ),
    (
        "old-kubernetes",
        vals(**HA_RWX),
        C.Facts(kubernetes_version=(1, 29), nodes=nodes(3), storage_classes=(AZFILE,)),
        [("kubernetes-version", C.Severity.ERROR, ("Kubernetes 1.29 has no GA webhook matchConditions", "1.30 or later"))],
    ),
    (
        "store-unreachable-is-a-warning",
        vals(**HA_RWX),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(AZFILE,), store_probes=(C.StoreProbe("myacr.azurecr.io", False, "unreachable (timed out)"), C.StoreProbe("ok.io", True))),
        [("artifact-store", C.Severity.WARNING, ("artifact store myacr.azurecr.io: unreachable (timed out)",))],
    ),
    (
        "wrong-types-are-problems",
        vals(enableClusterRegistry="yes", **{"clusterRegistry.clusterRegistryGCThreshold": 150, "clusterRegistry.registryService.scale": "huge"}, **HA_RWX),
        GOOD,
        [
            ("values", C.Severity.ERROR, ("whole percentage 0-100, not 150",)),
            ("values", C.Severity.ERROR, ("must be true or false, not 'yes'",)),
            ("values", C.Severity.ERROR, ("must be one of small, medium, large, not 'huge'",)),
        ],
    ),
    (
        "sideload-claim-missing",
        vals(enableLocalRegistry=True, **{"localRegistry.source": "persistentVolumeClaim", "localRegistry.claimName": "usb"}, **HA_RWX),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(AZFILE,), sideload_claim_exists=False),
        [("sideload-claim", C.Severity.ERROR, ("localRegistry.claimName 'usb' (the drive to side-load from) does not exist",))],
    ),
    (
        "sideload-hostpath-needs-no-claim",
        vals(enableLocalRegistry=True, **{"localRegistry.source": "hostPath"}, **HA_RWX),
        C.Facts(kubernetes_version=(1, 31), nodes=nodes(3), storage_classes=(AZFILE,), sideload_claim_exists=False),
        [],
    ),
    (
        "unreadable-facts-skip-with-a-warning",
        vals(),
        C.Facts(kubernetes_version=(1, 31), unavailable=("cannot list nodes (forbidden): HA node count not checked",)),
        [("cluster-facts", C.Severity.WARNING, ("skipped: cannot list nodes",))],
    ),
]


@pytest.mark.parametrize(("values_tree", "facts", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rules(values_tree: dict[str, Any], facts: C.Facts, want: list[tuple[str, C.Severity, tuple[str, ...]]]) -> None:
    got = run(values_tree, facts)
    assert [(p.check, p.severity) for p in got] == [(w[0], w[1]) for w in want], [p.render() for p in got]
    for problem, (_, _, texts) in zip(got, want):
        for text in texts:
            assert text in problem.message, problem.render()


def test_problem_names_the_value_to_change() -> None:
    (problem,) = run(vals(**{"clusterRegistry.storageSize": "200Gi"}, **HA_RWX), C.Facts(volume=C.Volume("v", "azurefile", "100Gi")))
    assert problem.value == V.K_STORAGE_SIZE
    assert problem.render() == (
        "ERROR [storage-immutable] storageSize cannot be modified after the initial deployment: the registry volume v "
        "is 100Gi and the new value is 200Gi; set clusterRegistry.storageSize back to 100Gi "
        "(value: global.networkfunctionextension.clusterRegistry.storageSize)"
    )


def test_errors_sort_before_warnings_and_exit_code() -> None:
    facts = C.Facts(kubernetes_version=(1, 28), store_probes=(C.StoreProbe("h", False, "down"),))
    got = run(vals(**HA_RWX), facts)
    assert [p.severity for p in got] == [C.Severity.ERROR, C.Severity.WARNING]
    assert C.exit_code(got) == 1
    assert C.exit_code(got[1:]) == 0
    assert C.exit_code([]) == 0


def test_whole_values_tree_and_subtree_read_alike() -> None:
    sub = vals(**{"clusterRegistry.storageSize": "1Ti"})
    assert V.load({"global": {"networkfunctionextension": sub}})[0] == V.load(sub)[0]
    assert V.load(sub)[0].storage_size == "1Ti"


def test_nothing_needs_the_cluster_when_facts_are_unknown() -> None:
    # Facts() = nothing could be read: only the values' own problems can fire.
    got = run(vals(**{"clusterRegistry.clusterRegistryGCCadence": "nope"}), C.Facts())
    assert [p.check for p in got] == ["values"]


@pytest.mark.parametrize(
    ("schedule", "error"),
    [
        ("0 0 * * *", None),
        ("*/15 2-4,6 1 JAN-mar mon-fri", None),
        ("5/10 * * * ?", None),
        ("@hourly", None),
        ("@every 1h30m", None),
        ("", "empty"),
        ("* * * *", "expected 5 fields"),
        ("60 * * * *", "minute field '60'"),
        ("* * 0 * *", "day of month field '0'"),
        ("* * * 13 *", "month field '13'"),
        ("* * * * 7", "day of week field '7'"),
        ("* * * * FUNDAY", "not a number or name"),
        ("5-1 * * * *", "starts after it ends"),
        ("*/0 * * * *", "step '0'"),
        ("1,,2 * * * *", "empty list element"),
        ("@weekly2", "unknown descriptor"),
        ("@every soon", "not a duration"),
        ("CRON_TZ=UTC 0 0 * * *", "time zone prefix"),
    ],
)
def test_cron(schedule: str, error: str | None) -> None:
    got = cron_error(schedule)
    if error is None:
        assert got is None
    else:
        assert got is not None and error in got


@pytest.mark.parametrize(
    ("text", "value"),
    [("100Gi", 100 * 2**30), ("1Ti", 2**40), ("1.5Gi", 3 * 2**29), ("500M", 500 * 10**6), ("1e3", 1000), ("2k", 2000), ("10", 10)],
)
def test_quantity(text: str, value: int) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["100GB", "Gi", "", "1.2.3Gi", "-", "10 Gi"])
def test_quantity_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_quantity(text)


@pytest.mark.parametrize(
    ("provisioner", "modes"),
    [
        ("disk.csi.azure.com", {"ReadWriteOnce"}),
        ("ebs.csi.aws.com", {"ReadWriteOnce"}),
        ("pd.csi.storage.gke.io", {"ReadWriteOnce"}),
        ("rancher.io/local-path", {"ReadWriteOnce"}),
        ("file.csi.azure.com", {"ReadWriteOnce", "ReadWriteMany"}),
        ("nfs.csi.k8s.io", {"ReadWriteOnce", "ReadWriteMany"}),
        ("cluster.local/nfs-subdir-external-provisioner", {"ReadWriteOnce", "ReadWriteMany"}),
        ("rook-ceph.cephfs.csi.ceph.com", {"ReadWriteOnce", "ReadWriteMany"}),
        ("rook-ceph.rbd.csi.ceph.com", {"ReadWriteOnce"}),
        ("example.com/unknown", None),
    ],
)
def test_known_provisioners(provisioner: str, modes: set[str] | None) -> None:
    got = C.access_modes(C.StorageClass("x", provisioner))
    assert (set(got) if got is not None else None) == modes


def test_multi_line_api_server_message_is_indented() -> None:
    p = C.Problem("match-condition", C.Severity.ERROR, "Syntax error\n | request.namespace ==\n | ....^", V.K_MATCH_CONDITION)
    lines = p.render().splitlines()
    assert lines[0] == "ERROR [match-condition] Syntax error"
    assert lines[1:] == ["     | request.namespace ==", "     | ....^ (value: global.networkfunctionextension.webhook.pod.mutation.matchConditionExpression)"]
