"""A multi-node Ray cluster on this machine: a head plus `vision` and `llm` worker nodes (separate
raylets offering those custom resources), with the application deployed from
`cluster/serve_config.cluster.yaml`, so replica placement, per-stage autoscaling and replica
failures can be tried without Kubernetes.

    python cluster/local.py [--vision-nodes 1] [--llm-nodes 1] [--port 8000]

runs until Ctrl-C, then stops every process it started. The tests use `LocalCluster` directly.
On one machine all proxies would bind the same port, so the local cluster runs one proxy (on
the head); on a real cluster the config's `EveryNode` applies.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "cluster" / "serve_config.cluster.yaml"


class LocalCluster:
    def __init__(self, vision_nodes: int = 1, llm_nodes: int = 1, cpus_per_node: int = 2, head_cpus: int = 2,
                 dashboard_port: int = 8265):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        from ray.cluster_utils import Cluster

        # the dashboard serves Ray's state API (where each replica runs)
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port})
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self.nodes = {"vision": [], "llm": []}
        for kind, count in (("vision", vision_nodes), ("llm", llm_nodes)):
            for _ in range(count):
                self.nodes[kind].append(self.cluster.add_node(num_cpus=cpus_per_node, resources={kind: 100}))
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def connect(self) -> None:
        import ray

        # replicas run the torch CPU path, whatever the caller's Triton settings
        ray.init(address=self.address, log_to_driver=False, runtime_env={"env_vars": {"TRITON_INTERPRET": "0"}})

    def deploy(self, port: int, overrides: dict | None = None, config: Path = CONFIG) -> str:
        """Deploy the config's application; returns its base URL."""
        from ray import serve

        sys.path.insert(0, str(ROOT))
        from deployments.app import app_from_config

        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        name, prefix, app = app_from_config(str(config), overrides)
        serve.run(app, name=name, route_prefix=prefix, blocking=False)
        return f"http://127.0.0.1:{port}"

    def replicas(self) -> dict[str, list]:
        """Alive Serve replica actors by deployment name, from Ray's state API."""
        from ray.util.state import list_actors

        out: dict[str, list] = {}
        for a in list_actors(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], limit=10000):
            if a.class_name.startswith("ServeReplica:"):
                out.setdefault(a.class_name.split(":")[-1], []).append(a)
        return out

    def node_kind(self, node_id: str) -> str:
        """'vision', 'llm' or 'head' for a Ray node id."""
        for kind, nodes in self.nodes.items():
            if any(n.node_id == node_id for n in nodes):
                return kind
        return "head"

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vision-nodes", type=int, default=1)
    ap.add_argument("--llm-nodes", type=int, default=1)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-dir", default=None, help="stands in for the model volume (default: the embedded model)")
    a = ap.parse_args(argv)
    cluster = LocalCluster(a.vision_nodes, a.llm_nodes)
    try:
        cluster.connect()
        if a.model_dir is None:
            sys.path.insert(0, str(ROOT))
            from vlm_core.default_model import default_model_dir

            a.model_dir = str(default_model_dir("awq"))
        # the nodes here have no GPUs and no /models volume
        url = cluster.deploy(a.port, {"model_dir": a.model_dir, "accelerator": "cpu"})
        print(f"cluster at {cluster.address}; the application answers at {url}/v1/chat/completions (Ctrl-C stops)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
