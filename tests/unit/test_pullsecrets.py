"""The namespaces' pull Secrets and the release's keys (#15), on an in-memory Secrets API that keeps
resourceVersions and answers 409 like the API server."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest

from cluster_registry import pullcreds
from cluster_registry.reconcile import pullsecrets as ps

NS, KEYS, NAME, HOST = "cluster-registry", "cr-pull-keys", "cluster-registry-pull", "127.0.0.1:5050"


class FakeSecrets:
    def __init__(self) -> None:
        self.items: dict[tuple[str, str], dict[str, Any]] = {}
        self.rv = 0
        self.writes: list[tuple[str, str, str]] = []  # (verb, namespace, name)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        got = self.items.get((namespace, name))
        return copy.deepcopy(got) if got else None

    def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        key = (namespace, body["metadata"]["name"])
        if key in self.items:
            raise ps.Conflict("exists")
        return self._store("create", key, body)

    def replace(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        live = self.items[(namespace, name)]
        if body["metadata"].get("resourceVersion") != live["metadata"]["resourceVersion"]:
            raise ps.Conflict("changed")
        return self._store("update", (namespace, name), body)

    def _store(self, verb: str, key: tuple[str, str], body: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        obj = copy.deepcopy(body)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.items[key] = obj
        self.writes.append((verb, *key))
        return copy.deepcopy(obj)


def credential(api: FakeSecrets, namespace: str) -> tuple[str, str]:
    secret = api.items[(namespace, NAME)]
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    entry = json.loads(base64.b64decode(secret["data"][".dockerconfigjson"]))["auths"][HOST]
    return entry["username"], entry["password"]


def keys(api: FakeSecrets) -> list[bytes]:
    got = ps.keys_of(api.items[(NS, KEYS)])
    assert got is not None
    return list(got)


def controller(api: FakeSecrets) -> ps.PullSecrets:
    return ps.PullSecrets(api, NS, KEYS, NAME, HOST)


def test_keys_and_secrets_are_created_once_and_a_second_pass_writes_nothing() -> None:
    api = FakeSecrets()
    c = controller(api)
    for ns in ("a", "b", "a"):
        c.add(ns)
    assert c.sync() == 2
    assert api.writes == [("create", NS, KEYS), ("create", "a", NAME), ("create", "b", NAME)]
    current, previous = keys(api)
    assert len(current) == len(previous) == 32 and current != previous
    for ns in ("a", "b"):
        user, password = credential(api, ns)
        assert user == f"ns/{ns}" and pullcreds.verify(keys(api), user, password) == ns
    assert pullcreds.verify(keys(api), "ns/b", credential(api, "a")[1]) is None  # a's password is not b's
    c.written.clear()  # even a full recheck (GETs) writes nothing when all is as it should be
    assert c.sync() == 0 and len(api.writes) == 3
    assert controller(api).sync() == 0 and keys(api) == [current, previous]  # a new leader keeps the keys


def test_a_rotation_keeps_the_old_credential_valid_until_every_secret_is_rewritten() -> None:
    api = FakeSecrets()
    c = controller(api)
    for ns in ("a", "b", "c"):
        c.add(ns)
    c.sync()
    old = {ns: credential(api, ns) for ns in "abc"}
    before = keys(api)
    ps.rotate_keys(api, NS, KEYS)
    after = keys(api)
    assert after[1] == before[0] and after[0] not in before
    for ns, (user, password) in old.items():  # pulls with a not-yet-rewritten Secret still authenticate
        assert pullcreds.verify(after, user, password) == ns
    assert c.sync() == 3 and [w[0] for w in api.writes[-3:]] == ["update"] * 3
    for ns in "abc":
        user, password = credential(api, ns)
        assert password != old[ns][1] and pullcreds.verify(after, user, password) == ns
    ps.rotate_keys(api, NS, KEYS)  # the next rotation retires the first credential
    assert all(pullcreds.verify(keys(api), u, p) is None for u, p in old.values())


def test_a_rotation_racing_another_change_fails_whole() -> None:
    api = FakeSecrets()
    controller(api).sync()
    stale = api.get(NS, KEYS)
    ps.rotate_keys(api, NS, KEYS)
    now = keys(api)
    assert stale is not None
    stale["data"] = ps.new_keys()
    with pytest.raises(ps.Conflict):
        api.replace(NS, KEYS, stale)
    assert keys(api) == now


def test_rotating_keys_that_do_not_exist_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="missing or malformed"):
        ps.rotate_keys(FakeSecrets(), NS, KEYS)


def test_someone_elses_secret_of_that_name_is_never_overwritten() -> None:
    api = FakeSecrets()
    api.create("a", {"metadata": {"name": NAME, "namespace": "a"}, "type": "Opaque", "data": {"x": "eQ=="}})
    c = controller(api)
    c.add("a")
    assert c.sync() == 0 and api.items[("a", NAME)]["data"] == {"x": "eQ=="}


def test_a_secret_deleted_by_hand_comes_back_on_the_full_recheck() -> None:
    api = FakeSecrets()
    c = controller(api)
    c.add("a")
    c.sync()
    del api.items[("a", NAME)]
    assert c.sync() == 0  # the cache says written
    c.written.clear()
    assert c.sync() == 1 and ("a", NAME) in api.items


@pytest.mark.parametrize("data", [{}, {"current": "not base64!", "previous": "AA=="}, {"current": "AAAA", "previous": "AAAA"}])
def test_malformed_keys_are_refused(data: dict[str, str]) -> None:
    assert ps.keys_of({"data": data}) is None
    api = FakeSecrets()
    api.create(NS, {"metadata": {"name": KEYS, "namespace": NS}, "data": data})
    with pytest.raises(ValueError, match="lacks valid"):
        controller(api).sync()
