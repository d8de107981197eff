#!/usr/bin/env python3
"""Renders a kustomization, for the subset of kustomize that deploy/kubernetes uses, so that the
tests can render the overlay on a machine without kubectl or kustomize (docs/deploy.md).

Supported fields: resources (files, or directories with a kustomization.yaml), namespace, labels
(`pairs`, metadata only: no includeSelectors/includeTemplates), images (name -> newName/newTag),
replicas, and patches given by `path` (strategic merge: maps merged key by key, lists of maps that
all have `name` merged by name, other lists replaced; the target is the patch's kind and name).
Anything else in a kustomization is an error, so that the manifests cannot quietly outgrow what is
checked. Usage: kustomize_lite.py DIR  (prints the rendered documents as a YAML stream).
"""

import copy
import os
import sys

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "replicas", "patches"}
# Kinds without a namespace (among those the manifests may use).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class KustomizeError(Exception):
    pass


def load_documents(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def render(directory):
    """The resources that `kubectl kustomize DIRECTORY` would print, as a list of dicts."""
    path = os.path.join(directory, "kustomization.yaml")
    if not os.path.isfile(path):
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    with open(path, encoding="utf-8") as f:
        k = yaml.safe_load(f) or {}
    unknown = set(k) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{path}: fields this renderer does not support: {sorted(unknown)}")

    resources = []
    for entry in k.get("resources", []):
        target = os.path.normpath(os.path.join(directory, entry))
        if os.path.isdir(target):
            resources.extend(render(target))
        elif os.path.isfile(target):
            resources.extend(load_documents(target))
        else:
            raise KustomizeError(f"{path}: resource {entry} not found")
    ids = [resource_id(r) for r in resources]
    if len(ids) != len(set(ids)):
        raise KustomizeError(f"{path}: duplicate resources {sorted(i for i in ids if ids.count(i) > 1)}")

    for entry in k.get("patches", []):
        if set(entry) != {"path"}:
            raise KustomizeError(f"{path}: only patches with a `path` are supported: {entry}")
        for patch in load_documents(os.path.join(directory, entry["path"])):
            target = find(resources, patch.get("kind"), patch.get("metadata", {}).get("name"))
            if target is None:
                raise KustomizeError(f"{entry['path']}: no resource {patch.get('kind')}/{patch.get('metadata', {}).get('name')} to patch")
            merged = strategic_merge(target, patch)
            target.clear()
            target.update(merged)

    for entry in k.get("replicas", []):
        matched = [r for r in resources if r["kind"] in WORKLOADS and r["metadata"]["name"] == entry["name"]]
        if not matched:
            raise KustomizeError(f"{path}: replicas for unknown workload {entry['name']}")
        for r in matched:
            r["spec"]["replicas"] = entry["count"]

    for entry in k.get("images", []):
        for r in resources:
            for container in containers(r):
                name, tag = split_image(container.get("image", ""))
                if name == entry["name"]:
                    new_name = entry.get("newName", name)
                    new_tag = entry.get("newTag", tag)
                    container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name

    for entry in k.get("labels", []):
        if set(entry) - {"pairs"}:
            raise KustomizeError(f"{path}: labels support only `pairs`: {entry}")
        for r in resources:
            r.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])

    if "namespace" in k:
        for r in resources:
            if r["kind"] not in CLUSTER_SCOPED:
                r["metadata"]["namespace"] = k["namespace"]
    return resources


def resource_id(r):
    return (r.get("kind"), r.get("metadata", {}).get("name"))


def find(resources, kind, name):
    for r in resources:
        if resource_id(r) == (kind, name):
            return r
    return None


def containers(resource):
    """The containers (and init containers) of a workload's pod template."""
    spec = resource.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def split_image(image):
    # A tag follows the last colon after the last slash (a registry's port is not a tag).
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1 :]
    return image, ""


def strategic_merge(base, patch):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and keyed_by_name(base) and keyed_by_name(patch):
        out = copy.deepcopy(base)
        for item in patch:
            existing = next((i for i, b in enumerate(out) if b["name"] == item["name"]), None)
            if existing is None:
                out.append(copy.deepcopy(item))
            else:
                out[existing] = strategic_merge(out[existing], item)
        return out
    return copy.deepcopy(patch)


def keyed_by_name(items):
    return all(isinstance(i, dict) and "name" in i for i in items)


def main():
    if len(sys.argv) != 2:
        print("usage: kustomize_lite.py DIR", file=sys.stderr)
        return 2
    try:
        resources = render(sys.argv[1])
    except (KustomizeError, OSError, yaml.YAMLError) as e:
        print(f"kustomize_lite: {e}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(resources, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
