#!/usr/bin/env python3
"""Checks deploy/kubernetes (run by tests/deploy.rs): renders the base and every overlay with
kustomize_lite.py (and compares with `kubectl kustomize` where kubectl is installed), validates every
document against the Kubernetes schemas of a pinned version (PyPI kubernetes-validate, strict: no
unknown field), and checks what docs/deploy.md promises of every container and of the whole:
probes, resources, security contexts, read-only model volume, PodDisruptionBudgets, NetworkPolicies,
Prometheus scrape annotations, anti-affinity for workers. Prints one line per check; exit 1 on any
failure. Usage: deploy_manifests.py REPO_ROOT
"""

import json
import os
import shutil
import subprocess
import sys

import kubernetes_validate
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kustomize_lite  # noqa: E402

# The Kubernetes version the manifests are written for (gRPC probes are GA from 1.27).
KUBERNETES_VERSION = "1.33.0"
WORKLOADS = ("Deployment", "StatefulSet")

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def normalized(value):
    """Order-insensitive where kustomize's order is an implementation detail: maps, and lists of
    named items (containers, env, volumes)."""
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [normalized(v) for v in value]
        if items and all(isinstance(i, dict) and "name" in i for i in items):
            return sorted(items, key=lambda i: str(i["name"]))
        return items
    return value


def compare_with_kubectl(directory, rendered):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print(f"skip {directory}: kubectl is not installed, kustomize_lite's rendering is not cross-checked")
        return
    out = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        check(False, f"kubectl kustomize {directory}: {out.stderr.strip()}")
        return
    theirs = {kustomize_lite.resource_id(d): normalized(d) for d in yaml.safe_load_all(out.stdout) if d}
    ours = {kustomize_lite.resource_id(d): normalized(d) for d in rendered}
    differing = sorted(str(i) for i in set(theirs) | set(ours) if theirs.get(i) != ours.get(i))
    check(not differing, f"{directory}: kustomize_lite renders what kubectl kustomize does {differing or ''}")


def pod_spec(doc):
    return doc["spec"]["template"]["spec"]


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def check_workload(doc):
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    spec = pod_spec(doc)
    pod_sc = spec.get("securityContext", {})
    check(pod_sc.get("runAsNonRoot") is True, f"{name}: pod runs as non-root")
    check(pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: RuntimeDefault seccomp")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec["containers"] + spec.get("initContainers", []):
        cname = f"{name} container {c['name']}"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            check(probe in c, f"{cname}: has a {probe}")
        check_probes(doc, c, cname)
        res = c.get("resources", {})
        check({"cpu", "memory"} <= set(res.get("requests", {})), f"{cname}: cpu and memory requests")
        check("memory" in res.get("limits", {}), f"{cname}: a memory limit")
        sc = c.get("securityContext", {})
        check(sc.get("allowPrivilegeEscalation") is False, f"{cname}: no privilege escalation")
        check(sc.get("readOnlyRootFilesystem") is True, f"{cname}: read-only root file system")
        check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{cname}: drops all capabilities")
        check(sc.get("privileged") is not True, f"{cname}: not privileged")
        for mount in c.get("volumeMounts", []):
            if mount["mountPath"].startswith("/models"):
                claim = volumes.get(mount["name"], {}).get("persistentVolumeClaim", {})
                check(mount.get("readOnly") is True and claim.get("readOnly") is True, f"{cname}: model mounted read-only")


# The probes each epserve component must have: gRPC health (grpc.health.v1) on the gRPC port for
# coordinators and workers — the overall status ("") is readiness, "liveness" stays SERVING through a
# load or a drain — and HTTP /health and /ready for the gateway.
GRPC_PORTS = {"epserve-worker": 50061, "epserve-coordinator": 50051}
# Loading a 200 GB checkpoint at ~100 MB/s takes about 35 minutes: the startup probe must allow more.
MIN_STARTUP_SECONDS = 45 * 60
# The components' default EPSERVE_SHUTDOWN_GRACE_SECONDS; the pod's termination grace must exceed it.
SHUTDOWN_GRACE_SECONDS = 30


def check_probes(doc, c, cname):
    name = doc["metadata"]["name"]
    probes = {k: c.get(k, {}) for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    if name in GRPC_PORTS:
        port = GRPC_PORTS[name]
        for kind, probe in probes.items():
            want = "liveness" if kind == "livenessProbe" else None
            grpc = probe.get("grpc", {})
            check(grpc.get("port") == port and grpc.get("service") == want, f"{cname}: {kind} is gRPC health on {port} (service {want or 'overall'})")
    elif name == "epserve-gateway":
        paths = {k: p.get("httpGet", {}).get("path") for k, p in probes.items()}
        check(paths == {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}, f"{cname}: /health for liveness, /ready for readiness")
    else:
        return
    startup = probes["startupProbe"]
    allowed = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if name == "epserve-worker":
        check(allowed >= MIN_STARTUP_SECONDS, f"{cname}: the startup probe allows a 200 GB load ({allowed} s)")
    grace = doc["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    check(grace > SHUTDOWN_GRACE_SECONDS, f"{cname}: termination grace {grace} s exceeds the drain's {SHUTDOWN_GRACE_SECONDS} s")


def check_cluster(docs, label):
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    names = {d["metadata"]["name"] for d in workloads}
    check({"epserve-etcd", "epserve-worker", "epserve-coordinator", "epserve-gateway"} <= names, f"{label}: etcd, worker, coordinator, gateway workloads")
    for d in workloads:
        check_workload(d)
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        pdbs = [p for p in by_kind.get("PodDisruptionBudget", []) if selects(p["spec"]["selector"], labels)]
        check(len(pdbs) == 1, f"{label}: {d['metadata']['name']} has a PodDisruptionBudget")
    kinds = {d["metadata"]["name"]: d["kind"] for d in workloads}
    check(kinds.get("epserve-worker") == "StatefulSet" and kinds.get("epserve-etcd") == "StatefulSet", f"{label}: workers and etcd are StatefulSets")
    check(kinds.get("epserve-coordinator") == "Deployment" and kinds.get("epserve-gateway") == "Deployment", f"{label}: coordinators and gateways are Deployments")
    etcd = next(d for d in workloads if d["metadata"]["name"] == "epserve-etcd")
    check(etcd["spec"]["replicas"] == 3, f"{label}: 3 etcd members")
    worker = next(d for d in workloads if d["metadata"]["name"] == "epserve-worker")
    anti = pod_spec(worker).get("affinity", {}).get("podAntiAffinity", {})
    check(bool(anti), f"{label}: workers spread over nodes (pod anti-affinity)")
    for d in workloads:
        if d["metadata"]["name"] in ("epserve-worker", "epserve-coordinator"):
            ann = d["spec"]["template"]["metadata"].get("annotations", {})
            check(ann.get("prometheus.io/scrape") == "true" and "prometheus.io/port" in ann, f"{label}: {d['metadata']['name']} scraped by Prometheus")
    services = {d["metadata"]["name"] for d in by_kind.get("Service", [])}
    check("epserve-gateway" in services, f"{label}: the gateway has a Service")

    policies = {d["metadata"]["name"]: d["spec"] for d in by_kind.get("NetworkPolicy", [])}
    deny = policies.get("epserve-default-deny", {})
    check(deny.get("podSelector") == {} and "ingress" not in deny and deny.get("policyTypes") == ["Ingress"], f"{label}: ingress denied by default")

    def sources(policy, port):
        return [rule.get("from") for rule in policies.get(policy, {}).get("ingress", []) if any(p["port"] == port for p in rule.get("ports", []))]

    check(sources("epserve-gateway", 8000) == [None], f"{label}: the gateway's port is open to all")
    worker_from = sources("epserve-worker", 50061)
    check(worker_from == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "epserve-coordinator"}}}]], f"{label}: workers accept exchanges from coordinators only")
    coord_from = sources("epserve-coordinator", 50051)
    check(coord_from == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "epserve-gateway"}}}]], f"{label}: coordinators accept requests from gateways only")
    etcd_from = sources("epserve-etcd", 2379)
    check(etcd_from == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "epserve"}}}]], f"{label}: etcd accepts clients from the cluster's pods only")
    for d in docs:
        check(d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "epserve", f"{label}: {d['kind']}/{d['metadata']['name']} is labelled part of epserve")

def negative_control(docs):
    """The checks must catch what they look for: a worker without a readiness probe (two checks),
    resources (two) or a read-only root file system, and with a TCP liveness probe in place of gRPC
    health, fails six checks."""
    global failures
    kept = failures
    failures = []
    worker = next(d for d in docs if (d["kind"], d["metadata"]["name"]) == ("StatefulSet", "epserve-worker"))
    container = pod_spec(worker)["containers"][0]
    for key in ("readinessProbe", "resources"):
        del container[key]
    container["securityContext"]["readOnlyRootFilesystem"] = False
    container["livenessProbe"] = {"tcpSocket": {"port": 50061}}
    print("negative control (six FAIL lines expected):")
    check_workload(worker)
    caught = len(failures)
    failures = kept
    check(caught >= 6, f"negative control: a broken worker fails {caught} checks")


def main():
    root = sys.argv[1]
    kube = os.path.join(root, "deploy", "kubernetes")
    targets = [os.path.join(kube, "base")] + [os.path.join(kube, "overlays", o) for o in sorted(os.listdir(os.path.join(kube, "overlays")))]
    summary = {}
    for target in targets:
        label = os.path.relpath(target, root)
        docs = kustomize_lite.render(target)
        summary[label] = len(docs)
        compare_with_kubectl(target, docs)
        for d in docs:
            try:
                kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
                check(True, f"{label}: {d['kind']}/{d['metadata']['name']} validates against Kubernetes {KUBERNETES_VERSION}")
            except kubernetes_validate.ValidationError as e:
                check(False, f"{label}: {d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}")
        check_cluster(docs, label)
    negative_control(kustomize_lite.render(targets[0]))
    print(json.dumps({"rendered": summary, "failures": len(failures)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
