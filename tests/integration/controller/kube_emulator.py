"""A small shim over kmock 0.8's KubernetesEmulator so that real kopf and the real kubernetes
client can run against it over HTTP.

What kmock 0.8 lacks, and what this module adds (each is covered by test_ctl_emulator.py):

1. `GET /api/v1/namespaces[/name]` crashes kmock's path parser (500). kopf lists namespaces in
   namespaced mode, so the parser is wrapped to route these paths to the `namespaces` plural.
2. Objects get no `uid`, `resourceVersion`, `generation` or `creationTimestamp`, and
   `generateName` is ignored (kopf's Events all collide on the same name). They are stamped here;
   `generation` is bumped only when `spec` changes (as the API server does with a status
   subresource), which is what makes `status.observedGeneration` testable.
3. A JSON-patch `test` op that fails (kopf's optimistic lock on resourceVersion) is a 500 in
   kmock; the API server says 422. Same for an invalid merge.
4. `labelSelector` is ignored by kmock on LIST; equality-based selectors (`a=b,c!=d,e`) are
   applied here. Watches still ignore selectors (kopf filters client-side anyway).
5. There is no garbage collector. `collect_garbage()` emulates the cluster's background
   cascade (ownerReferences) on demand, so tests can show that the operator does not fight it.
6. Failure injection (not a gap, a test tool): `refuse_creates(resource)` answers 503 to
   creations of that resource until `refuse_creates(resource, False)`.
7. The `scale` subresource: kmock would serve `GET .../scale` as the object itself and apply a
   Scale patch to the object as it is. Here `GET` answers an autoscaling/v1 Scale built from
   the CRD's `specReplicasPath`, `statusReplicasPath` and `labelSelectorPath`, and `PATCH`
   (merge patch of a Scale, as `kubectl scale` and the HPA send) moves the object's
   spec replicas, bumps its generation and emits MODIFIED, as the API server does.
8. Speed: kmock picks a reaction by scanning every request served so far through each filter,
   which is quadratic (a 30 s test spent 90% there; 4 s now). Object requests (list, watch,
   get, create, patch, delete) go straight to the emulator's own handlers instead; discovery
   requests still take kmock's route.

Mutations are serialized by one lock so that the stamping and the store never interleave.
PUT (replace) and deletecollection stay unsupported: the operator never uses them.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import pathlib
import uuid
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jsonpatch
import kmock
import yaml
from kmock._internal import dicts, enums, parsing, rendering

_original_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (3, 4):
        name = parts[3] if len(parts) == 4 else None
        return parsing.ParsedPath(group="", version="v1", plural="namespaces", name=name)
    return _original_parse_path(path)


# The request parser looks the function up on the module at call time, so swapping it is enough.
parsing.parse_path = _parse_path


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def matches_selector(labels: Mapping[str, str], selector: str) -> bool:
    """Equality-based label selector semantics: `a=b`, `a==b`, `a!=b`, `a`, `!a`, comma = AND."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _json_path(path: str) -> list[str]:
    """A CRD scale path (`.spec.replicas`) as keys."""
    return path.strip(".").split(".")


def _get_path(obj: Mapping[str, Any], keys: list[str]) -> Any:
    for key in keys:
        if not isinstance(obj, Mapping) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _set_path(obj: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        obj = obj.setdefault(key, {})
    obj[keys[-1]] = value


class _DirectDispatch(kmock.RawHandler):  # type: ignore[misc]
    """Sits between KubernetesScaffold and RawHandler in the MRO (see gap 8)."""

    __slots__ = ()

    async def _handle(self, request: kmock.Request) -> Any:
        serve = {
            enums.action.LIST: "_serve_list", enums.action.WATCH: "_serve_watch",
            enums.action.FETCH: "_serve_fetch", enums.action.CREATE: "_serve_create",
            enums.action.UPDATE: "_serve_update", enums.action.DELETE: "_serve_delete",
        }.get(request.action) if request.resource is not None and request.resource.plural else None
        if serve is None:
            return await super()._handle(request)
        return await rendering.Response(payload=getattr(self, serve))(request)


class ClusterEmulator(kmock.KubernetesEmulator, _DirectDispatch):  # type: ignore[misc]
    """kmock's emulator plus the gaps listed in the module docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)
        self._mutation_lock = asyncio.Lock()
        self._refused: set[Any] = set()
        self._scale_paths: dict[Any, dict[str, str]] = {}
        with warnings.catch_warnings():  # kmock uses the deprecated importlib.resources API
            warnings.simplefilter("ignore", DeprecationWarning)
            self.resources.load_bundled()
        self.objects["v1/namespaces", None, "default"] = self._stamped(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}
        )

    def declare_crds(self, crd_dir: pathlib.Path) -> list[dict[str, Any]]:
        """Serve discovery for every CRD YAML in `crd_dir`; returns the parsed CRDs."""
        crds = [yaml.safe_load(p.read_text()) for p in sorted(crd_dir.glob("*.yaml"))]
        for crd in crds:
            spec = crd["spec"]
            names = spec["names"]
            for version in spec["versions"]:
                key = f"{spec['group']}/{version['name']}/{names['plural']}"
                self.resources[key] = kmock.ResourceInfo(
                    kind=names["kind"],
                    singular=names.get("singular"),
                    namespaced=spec["scope"] == "Namespaced",
                    shortnames=set(names.get("shortNames", [])),
                    categories=set(names.get("categories", [])),
                    subresources=set(version.get("subresources", {})),
                    verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
                )
                scale = (version.get("subresources") or {}).get("scale")
                if scale:
                    self._scale_paths[kmock.resource(key)] = scale
        return crds

    def refuse_creates(self, resource: str, refuse: bool = True) -> None:
        """Answer 503 to every creation of `resource` (e.g. 'v1/pods') while `refuse`."""
        (self._refused.add if refuse else self._refused.discard)(kmock.resource(resource))

    def _stamped(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = str(next(self._versions))
        meta["generation"] = 1
        return obj

    async def _handle(self, request: kmock.Request) -> Any:
        if request.subresource == "scale" and request.resource in self._scale_paths:
            return await rendering.Response(payload=self._serve_scale)(request)
        mutating = (enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE)
        if request.resource is None or request.action not in mutating:
            return await super()._handle(request)
        if request.action == enums.action.CREATE and request.resource in self._refused:
            raise kmock.KubernetesError(status=503, reason="ServiceUnavailable",
                                        message="creations refused by the test")
        async with self._mutation_lock:
            try:
                if request.action == enums.action.CREATE and isinstance(request.data, dict):
                    self._stamped(request.data)
                    if request.namespace:
                        request.data["metadata"]["namespace"] = request.namespace
                elif request.action == enums.action.UPDATE and request.name is not None:
                    self._stamp_update(request)
                elif request.action == enums.action.DELETE and request.name is not None:
                    self._stamp_delete(request)
                return await super()._handle(request)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, ValueError) as e:
                raise kmock.KubernetesError(status=422, reason="Invalid", message=str(e)) from e

    def _current(self, request: kmock.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _stamp_update(self, request: kmock.Request) -> None:
        current = self._current(request)
        if current is None:
            return  # kmock answers 404 itself
        # Apply the patch to a copy first: a failing `test` op must fail before anything changes,
        # and the spec comparison decides whether the generation moves.
        patched = dicts.patch_dict(current, request.data)
        meta: dict[str, Any] = {"resourceVersion": str(next(self._versions))}
        if request.subresource is None and patched.get("spec") != current.get("spec"):
            meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
        if isinstance(request.data, list):
            request.data.extend(
                {"op": "add", "path": f"/metadata/{k}", "value": v} for k, v in meta.items()
            )
        else:
            request.data.setdefault("metadata", {}).update(meta)

    def _stamp_delete(self, request: kmock.Request) -> None:
        current = self._current(request)
        if current is not None and current["metadata"].get("finalizers"):
            key = (request.resource, request.namespace, request.name)
            # kmock marks deletionTimestamp next; the MODIFIED event must carry a new version.
            self.objects[key].patch({"metadata": {"resourceVersion": str(next(self._versions))}})

    async def _serve_scale(self, request: kmock.Request) -> Any:
        """GET or merge-PATCH of `<object>/scale` (gap 7)."""
        paths = self._scale_paths[request.resource]
        spec_path = _json_path(paths["specReplicasPath"])
        key = (request.resource, request.namespace, request.name)
        async with self._mutation_lock:
            if key not in self.objects or self.objects[key].deleted:
                raise kmock.KubernetesError(status=404, reason="NotFound",
                                            message=f"{request.name} not found")
            if request.action == enums.action.UPDATE:
                replicas = ((request.data or {}).get("spec") or {}).get("replicas")
                if not isinstance(replicas, int) or replicas < 0:
                    raise kmock.KubernetesError(status=422, reason="Invalid",
                                                message="spec.replicas: must be an integer >= 0")
                current = copy.deepcopy(self.objects[key].raw)
                patch: dict[str, Any] = {"metadata": {
                    "resourceVersion": str(next(self._versions)),
                    "generation": int(current["metadata"].get("generation", 1)) + (
                        _get_path(current, spec_path) != replicas)}}
                _set_path(patch, spec_path, replicas)
                self.objects[key].patch(patch)
                await self._buses[request.resource].put(
                    {"type": "MODIFIED", "object": copy.deepcopy(self.objects[key].raw)})
            obj = copy.deepcopy(self.objects[key].raw)
        status: dict[str, Any] = {
            "replicas": _get_path(obj, _json_path(paths["statusReplicasPath"])) or 0}
        if "labelSelectorPath" in paths:
            selector = _get_path(obj, _json_path(paths["labelSelectorPath"]))
            if selector:
                status["selector"] = selector
        meta = obj["metadata"]
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                                  "creationTimestamp") if k in meta},
                "spec": {"replicas": _get_path(obj, spec_path) or 0}, "status": status}

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            result["items"] = [
                item
                for item in result["items"]
                if matches_selector(item.get("metadata", {}).get("labels") or {}, selector)
            ]
        result["metadata"]["resourceVersion"] = str(next(self._versions))
        return result

    def live_objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Raw bodies of the non-deleted objects of one resource (e.g. 'v1/pods')."""
        wanted = kmock.resource(resource)
        return [
            obj.raw
            for (res, ns, _), obj in self._items()
            if res == wanted and not obj.deleted and (namespace is None or ns == namespace)
        ]

    def request_log(self) -> list[kmock.Request]:
        """Every request served so far, in arrival order."""
        return list(self._requests)

    def _items(self) -> Iterator[tuple[tuple[Any, str | None, str], Any]]:
        return iter(list(self.objects.items()))

    async def collect_garbage(self) -> int:
        """Delete objects whose controller owner is gone, until nothing changes; returns the
        number deleted. This is the cluster's background GC, which kmock does not have."""
        num_deleted = 0
        while True:
            async with self._mutation_lock:
                live_uids = {
                    obj.raw["metadata"].get("uid") for _, obj in self._items() if not obj.deleted
                }
                orphans = [
                    (key, obj)
                    for key, obj in self._items()
                    if not obj.deleted
                    and (refs := obj.raw["metadata"].get("ownerReferences"))
                    and all(ref["uid"] not in live_uids for ref in refs)
                ]
                for (resource, _, _), obj in orphans:
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})
            if not orphans:
                return num_deleted
            num_deleted += len(orphans)
