"""Container launcher used by the node agent (tests/support/nodeagent.py): `python podsandbox.py SPEC.json`.

Runs as root, single-threaded, and ends by exec'ing the container's command, so the PID the agent
holds is the container's main process. Before that it builds the container's view of the machine:

* a private mount namespace and UTS namespace (hostname = the pod's), and the pod's network
  namespace (``setns``);
* a root filesystem: an overlay over the host's ``/`` whose writable layer is a private tmpfs (what
  the container writes outside its volumes vanishes with it, as in a container image layer), with
  ``/proc`` and ``/sys`` bound in and a private ``/dev`` (tmpfs with the usual device nodes);
* every volume mount bound at its ``mountPath`` (read-only when asked), including the service
  account token at ``/var/run/secrets/kubernetes.io/serviceaccount`` and the pod's ``/etc/hosts``;
* ``chroot`` into it, ``chdir`` to the working directory, drop to ``runAsUser``/``runAsGroup``.

Only the standard library is used: it must start fast and must not import the project.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None, target.encode(), fstype.encode() if fstype else None,
            ctypes.c_ulong(flags), data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def resolve_in_root(root: str, path: str) -> str:
    """PATH as seen inside ROOT (symlinks, absolute ones included, resolved as chroot would)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root + "/" + "/".join([*resolved, part])
        if os.path.islink(candidate):
            hops += 1
            if hops > 40:
                raise OSError(40, f"too many symlinks in {path}")
            link = os.readlink(candidate)
            if link.startswith("/"):
                resolved = []
            parts = [p for p in link.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return root + "/" + "/".join(resolved)


def setup_dev(dev: str) -> None:
    """A private /dev like a container runtime's: a tmpfs with the usual device nodes bound in."""
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=0755")
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        if os.path.exists(f"/dev/{name}"):
            with open(f"{dev}/{name}", "a"):
                pass
            mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    os.makedirs(f"{dev}/pts")
    if os.path.isdir("/dev/pts"):
        mount("/dev/pts", f"{dev}/pts", None, MS_BIND)
    os.makedirs(f"{dev}/shm")
    mount("tmpfs", f"{dev}/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx")):
        os.symlink(target, f"{dev}/{link}")


def _ensure_target(path: str, is_file: bool) -> None:
    if os.path.lexists(path):
        return
    if is_file:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a"):
            pass
    else:
        os.makedirs(path, exist_ok=True)


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec: dict[str, Any] = json.load(f)
    root: str = os.path.realpath(spec["root"])
    scratch: str = os.path.realpath(spec["scratch"])

    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare(CLONE_NEWNS|CLONE_NEWUTS)")
    hostname = str(spec.get("hostname") or "")
    if hostname:
        _check(_libc.sethostname(hostname.encode(), len(hostname.encode())), "sethostname")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    fd = os.open(spec["netns"], os.O_RDONLY)
    _check(_libc.setns(fd, CLONE_NEWNET), "setns(net)")
    os.close(fd)

    os.makedirs(root, exist_ok=True)
    os.makedirs(scratch, exist_ok=True)
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    os.makedirs(f"{scratch}/upper")
    os.makedirs(f"{scratch}/work")
    mount("overlay", root, "overlay", 0, f"lowerdir=/,upperdir={scratch}/upper,workdir={scratch}/work")
    for d in ("/proc", "/sys"):
        mount(d, root + d, None, MS_BIND | MS_REC)
    setup_dev(root + "/dev")

    for m in spec["mounts"]:
        target = resolve_in_root(root, m["target"])
        _ensure_target(target, os.path.isfile(m["source"]))
        mount(m["source"], target, None, MS_BIND | MS_REC)
        if m.get("readOnly"):
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)

    # The image's files live in host trees (the repo's venv and tools, the Python installation). A
    # volume mounted over one of their parents (an emptyDir at /tmp while the repo is cloned under
    # /tmp) would hide them: bind them back, read-only, on top.
    targets = [m["target"].rstrip("/") or "/" for m in spec["mounts"]]
    for host in spec.get("hostTrees") or []:
        if any(host == t or host.startswith(t.rstrip("/") + "/") for t in targets):
            target = resolve_in_root(root, host)
            _ensure_target(target, False)
            mount(host, target, None, MS_BIND | MS_REC)
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)

    # The image's files must be usable by a non-root user: directories on the way to them may be
    # private on this machine (a pyenv under /root). Changing the mode copies the directory up into
    # the container's private layer; the host is untouched.
    for d in spec.get("traverse") or []:
        p = root + d
        if os.path.isdir(p):
            os.chmod(p, os.stat(p).st_mode | 0o055)
    if spec.get("readOnlyRoot"):
        mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    os.chroot(root)
    os.chdir(spec.get("workingDir") or "/")
    gid = spec.get("runAsGroup")
    uid = spec.get("runAsUser")
    groups = spec.get("supplementalGroups") or []
    if uid is not None or gid is not None:
        os.setgroups([int(g) for g in groups])
        if gid is not None:
            os.setgid(int(gid))
        elif uid is not None:
            os.setgid(int(uid))
        if uid is not None:
            os.setuid(int(uid))
    if spec.get("noNewPrivs"):
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    argv: list[str] = spec["argv"]
    env: dict[str, str] = spec["env"]
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except OSError as e:
        print(f"podsandbox: {e}", file=sys.stderr, flush=True)
        sys.exit(128)
