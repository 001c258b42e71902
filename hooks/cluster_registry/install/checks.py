"""The pure validation core: facts about the cluster that the values must fit -> a list of problems.

Facts only: the chart's ``values.schema.json`` checks types and shapes (``values.load`` the shapes it
cannot express: cron schedules, image references), ``_validate.tpl`` combinations of values. No I/O. The adapters in ``validate.py`` gather :class:`Facts` (nodes, storage classes, the existing
registry volume, the API server's verdict on the CEL expression, the artifact-store probes); every
rule here turns values and facts into :class:`Problem` s, each naming what is wrong and the value to
change. Rules and their ids are stable: ``validate --dry-run`` lists them, tests pin their text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from cluster_registry.install import values as V
from cluster_registry.units import parse_quantity

MIN_HA_NODES = 3
MIN_MATCH_CONDITIONS_VERSION = (1, 30)  # admissionregistration matchConditions GA

# Provisioners by the access modes they can give. Matched exactly, then by the suffix rules below.
RWO_ONLY = frozenset(
    {
        "disk.csi.azure.com",
        "kubernetes.io/azure-disk",
        "ebs.csi.aws.com",
        "kubernetes.io/aws-ebs",
        "pd.csi.storage.gke.io",
        "kubernetes.io/gce-pd",
        "rancher.io/local-path",
        "kubernetes.io/no-provisioner",
        "openebs.io/local",
        "rbd.csi.ceph.com",
        "kubernetes.io/rbd",
        "csi.vsphere.vmware.com",
        "kubernetes.io/cinder",
        "cinder.csi.openstack.org",
        "topolvm.io",
        "hostpath.csi.k8s.io",
        "kubevirt.io.hostpath-provisioner",
    }
)
RWX = frozenset(
    {
        "file.csi.azure.com",
        "kubernetes.io/azure-file",
        "blob.csi.azure.com",
        "efs.csi.aws.com",
        "filestore.csi.storage.gke.io",
        "nfs.csi.k8s.io",
        "cephfs.csi.ceph.com",
        "kubernetes.io/cephfs",
        "kubernetes.io/glusterfs",
        "driver.longhorn.io",
    }
)


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Problem:
    check: str  # the rule's stable id
    severity: Severity
    message: str  # what is wrong
    value: str = ""  # the value to change, relative to values.PREFIX ("" = none)

    def render(self) -> str:
        """One line, or continuation lines indented (a multi-line message from the API server)."""
        message = self.message.rstrip().replace("\n", "\n    ")
        text = f"{self.severity.value.upper()} [{self.check}] {message}"
        if self.value:
            text += f" (value: {V.PREFIX}{self.value})"
        return text


@dataclass(frozen=True)
class Node:
    name: str
    labels: Mapping[str, str]
    ready: bool
    schedulable: bool


@dataclass(frozen=True)
class StorageClass:
    name: str
    provisioner: str
    is_default: bool = False
    parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Volume:
    """The registry's existing PersistentVolumeClaim (present on upgrade)."""

    name: str
    storage_class: str
    requested: str  # spec.resources.requests.storage as written
    access_modes: tuple[str, ...] = ()
    exists: bool = True  # False: an existingClaim that was looked for and not found


@dataclass(frozen=True)
class StoreProbe:
    host: str
    ok: bool
    message: str = ""


@dataclass(frozen=True)
class Facts:
    """What the adapters read from the cluster. ``None`` = could not be read (the rule is skipped)."""

    kubernetes_version: tuple[int, int] | None = None
    nodes: tuple[Node, ...] | None = None
    storage_classes: tuple[StorageClass, ...] | None = None
    volume: Volume | None = None  # None on first install
    match_condition_error: str | None = None  # the API server's message; None = accepted/unchecked
    store_probes: tuple[StoreProbe, ...] = ()
    sideload_claim_exists: bool | None = None  # localRegistry.claimName in the release namespace
    unavailable: tuple[str, ...] = ()  # facts that could not be read, with why (warnings)


Rule = Callable[[V.Values, Facts], list[Problem]]


@dataclass(frozen=True)
class Check:
    id: str
    description: str
    rule: Rule
    needs_cluster: bool = False


def _err(check: str, message: str, value: str = "") -> Problem:
    return Problem(check, Severity.ERROR, message, value)


def _warn(check: str, message: str, value: str = "") -> Problem:
    return Problem(check, Severity.WARNING, message, value)


# --- rules -----------------------------------------------------------------------------------


def check_ha_nodes(v: V.Values, f: Facts) -> list[Problem]:
    if not v.any_ha or f.nodes is None:
        return []
    key, _, want = v.system_pool_label.partition("=")
    pool = [n for n in f.nodes if key in n.labels and (not want or n.labels[key] == want)]
    usable = [n for n in pool if n.ready and n.schedulable]
    if len(usable) >= MIN_HA_NODES:
        return []
    which = " and ".join(
        k for k, on in ((V.K_REGISTRY_HA, v.registry_ha), (V.K_WEBHOOK_HA, v.webhook_ha)) if on
    )
    not_usable = sorted(n.name for n in pool if not (n.ready and n.schedulable))
    detail = f" ({', '.join(not_usable)} not Ready or not schedulable)" if not_usable else ""
    message = (
        f"high availability needs at least {MIN_HA_NODES} schedulable, Ready system-pool nodes "
        f"(label {v.system_pool_label}); {len(usable)} of the {len(pool)} nodes with that label are{detail}. "
        f"Set {which} to false, add system-pool nodes, or set {V.K_HA_ALLOW_FEWER_NODES} to true "
        "to accept the risk"
    )
    if v.ha_allow_fewer_nodes:
        return [_warn("ha-nodes", message + " (accepted: the override is set)", V.K_HA_ALLOW_FEWER_NODES)]
    return [_err("ha-nodes", message, V.K_REGISTRY_HA if v.registry_ha else V.K_WEBHOOK_HA)]


def selected_class(v: V.Values, f: Facts) -> StorageClass | None:
    classes = f.storage_classes or ()
    if v.storage_class_name:
        return next((c for c in classes if c.name == v.storage_class_name), None)
    defaults = [c for c in classes if c.is_default]
    return defaults[0] if len(defaults) == 1 else None


def check_existing_claim(v: V.Values, f: Facts) -> list[Problem]:
    if not (v.uses_volume and v.existing_claim) or f.volume is None:
        return []
    if not f.volume.exists:
        return [
            _err(
                "existing-claim",
                f"existingClaim {v.existing_claim!r} does not exist in the release namespace; create it "
                "first or set existingClaim to \"\" to let the chart create the registry volume",
                V.K_EXISTING_CLAIM,
            )
        ]
    if v.registry_ha and "ReadWriteMany" not in f.volume.access_modes:
        modes = ", ".join(f.volume.access_modes) or "none"
        return [
            _err(
                "existing-claim",
                f"existingClaim {v.existing_claim!r} has access modes {modes}, but {V.K_REGISTRY_HA} needs "
                "ReadWriteMany (3 replicas share the volume); use a ReadWriteMany claim or turn registry "
                "high availability off",
                V.K_EXISTING_CLAIM,
            )
        ]
    return []


def check_storage_class(v: V.Values, f: Facts) -> list[Problem]:
    if not v.uses_volume or v.existing_claim or f.storage_classes is None:
        return []
    names = ", ".join(sorted(c.name for c in f.storage_classes)) or "none"
    if v.storage_class_name:
        if selected_class(v, f) is None:
            return [
                _err(
                    "storage-class",
                    f"storage class {v.storage_class_name!r} does not exist (the cluster has: {names})",
                    V.K_STORAGE_CLASS,
                )
            ]
        return []
    defaults = sorted(c.name for c in f.storage_classes if c.is_default)
    if not defaults:
        return [
            _err(
                "storage-class",
                f"no storage class is named and the cluster has no default storage class (it has: {names}); "
                "name one, or mark one default",
                V.K_STORAGE_CLASS,
            )
        ]
    if len(defaults) > 1:
        return [
            _warn(
                "storage-class",
                f"several storage classes are marked default ({', '.join(defaults)}); the API server "
                "picks the newest: name one to be sure",
                V.K_STORAGE_CLASS,
            )
        ]
    return []


def access_modes(sc: StorageClass) -> frozenset[str] | None:
    """The access modes ``sc``'s provisioner can give, or None when it is not known."""
    p = sc.provisioner
    if p in RWX or p.endswith(".cephfs.csi.ceph.com") or "nfs" in p.lower():
        return frozenset({"ReadWriteOnce", "ReadWriteMany"})
    if p in RWO_ONLY or p.endswith(".rbd.csi.ceph.com"):
        return frozenset({"ReadWriteOnce"})
    return None


def check_access_mode(v: V.Values, f: Facts) -> list[Problem]:
    if not (v.uses_volume and v.registry_ha) or v.existing_claim or v.storage_access_mode:
        return []  # a declared mode is the values' word: _validate.tpl refuses ReadWriteOnce with HA
    sc = selected_class(v, f)
    if sc is None:
        return []  # check_storage_class reports it
    modes = access_modes(sc)
    if modes is None:
        return [
            _warn(
                "storage-access-mode",
                f"cannot tell whether storage class {sc.name!r} (provisioner {sc.provisioner}) gives "
                f"ReadWriteMany, which {V.K_REGISTRY_HA} needs; declare it with "
                f"{V.K_STORAGE_ACCESS_MODE}: ReadWriteMany (or ReadWriteOnce)",
                V.K_STORAGE_ACCESS_MODE,
            )
        ]
    if "ReadWriteMany" in modes:
        return []
    return [
        _err(
            "storage-access-mode",
            f"storage class {sc.name!r} (provisioner {sc.provisioner}) gives only ReadWriteOnce, but "
            f"{V.K_REGISTRY_HA} needs ReadWriteMany (3 replicas share the volume); choose a "
            "ReadWriteMany class (e.g. Azure Files, NFS, CephFS) or turn registry high availability off",
            V.K_STORAGE_CLASS,
        )
    ]


def check_storage_immutable(v: V.Values, f: Facts) -> list[Problem]:
    if not v.uses_volume or v.existing_claim or f.volume is None or not f.volume.exists:
        return []
    out = []
    vol = f.volume
    try:
        changed = parse_quantity(v.storage_size) != parse_quantity(vol.requested)
    except ValueError:
        changed = False  # an invalid new size is check_storage_size's to report
    if changed:
        out.append(
            _err(
                "storage-immutable",
                f"storageSize cannot be modified after the initial deployment: the registry volume "
                f"{vol.name} is {vol.requested} and the new value is {v.storage_size}; set "
                f"{V.K_STORAGE_SIZE} back to {vol.requested}",
                V.K_STORAGE_SIZE,
            )
        )
    if v.storage_class_name and v.storage_class_name != vol.storage_class:
        out.append(
            _err(
                "storage-immutable",
                f"storageClassName cannot be modified after the initial deployment: the registry volume "
                f"{vol.name} uses {vol.storage_class or '(none)'!r} and the new value is "
                f"{v.storage_class_name!r}; set {V.K_STORAGE_CLASS} back to {vol.storage_class!r}",
                V.K_STORAGE_CLASS,
            )
        )
    return out


def check_sideload_claim(v: V.Values, f: Facts) -> list[Problem]:
    if not (v.enable_local_registry and v.local_source == "persistentVolumeClaim") or f.sideload_claim_exists is not False:
        return []
    return [
        _err(
            "sideload-claim",
            f"localRegistry.claimName {v.local_claim!r} (the drive to side-load from) does not exist in the "
            "release namespace; create the PersistentVolumeClaim first or name the right one",
            V.K_LOCAL_CLAIM,
        )
    ]


def check_match_condition(v: V.Values, f: Facts) -> list[Problem]:
    if not v.enable_cluster_registry or f.match_condition_error is None:
        return []
    return [
        _err(
            "match-condition",
            f"the API server rejects the webhook match condition: {f.match_condition_error}",
            V.K_MATCH_CONDITION,
        )
    ]


def check_kubernetes_version(v: V.Values, f: Facts) -> list[Problem]:
    if not v.enable_cluster_registry or f.kubernetes_version is None:
        return []
    if f.kubernetes_version >= MIN_MATCH_CONDITIONS_VERSION:
        return []
    have = ".".join(map(str, f.kubernetes_version))
    want = ".".join(map(str, MIN_MATCH_CONDITIONS_VERSION))
    return [
        _err(
            "kubernetes-version",
            f"Kubernetes {have} has no GA webhook matchConditions (needed by the admission webhook); "
            f"upgrade the cluster to {want} or later, or set enableClusterRegistry to false",
            V.K_CLUSTER_REGISTRY,
        )
    ]


def check_artifact_store(v: V.Values, f: Facts) -> list[Problem]:
    return [
        _warn(
            "artifact-store",
            f"artifact store {p.host}: {p.message} (disconnected installs are allowed; images "
            "not already in the cluster registry cannot be copied until it is reachable)",
        )
        for p in f.store_probes
        if not p.ok
    ]


def check_facts_available(v: V.Values, f: Facts) -> list[Problem]:
    return [_warn("cluster-facts", f"skipped: {why}") for why in f.unavailable]


CHECKS: tuple[Check, ...] = (
    Check(
        "kubernetes-version",
        f"the API server is Kubernetes {'.'.join(map(str, MIN_MATCH_CONDITIONS_VERSION))}+ (GA matchConditions)",
        check_kubernetes_version,
        True,
    ),
    Check(
        "ha-nodes",
        f"high availability has at least {MIN_HA_NODES} schedulable, Ready system-pool nodes",
        check_ha_nodes,
        True,
    ),
    Check("existing-claim", "existingClaim exists and, with HA, is ReadWriteMany", check_existing_claim, True),
    Check("storage-class", "the storage class exists (or a default class when none is named)", check_storage_class, True),
    Check("storage-access-mode", "registry high availability has ReadWriteMany storage", check_access_mode, True),
    Check(
        "storage-immutable",
        "storageSize and storageClassName match the existing registry volume (upgrade)",
        check_storage_immutable,
        True,
    ),
    Check("sideload-claim", "the side-loading drive's PersistentVolumeClaim exists", check_sideload_claim, True),
    Check(
        "match-condition",
        "the API server accepts matchConditionExpression (server-side dry-run)",
        check_match_condition,
        True,
    ),
    Check("artifact-store", "the artifact store is reachable with the credentials (warning only)", check_artifact_store, True),
    Check("cluster-facts", "every cluster fact could be read (warning only)", check_facts_available, True),
)


def run(values: V.Values, facts: Facts, value_problems: list[V.ValueProblem] = []) -> list[Problem]:  # noqa: B006
    """Every problem, errors first, in the stable order of CHECKS."""
    out = [_err("values", f"{p.message}", p.key) for p in value_problems]
    for check in CHECKS:
        out.extend(check.rule(values, facts))
    return sorted(out, key=lambda p: p.severity != Severity.ERROR)


def exit_code(problems: list[Problem]) -> int:
    """0: no errors (warnings allowed); 1: at least one error."""
    return 1 if any(p.severity == Severity.ERROR for p in problems) else 0
