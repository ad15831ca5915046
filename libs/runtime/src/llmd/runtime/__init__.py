"""What every llmd service shares: config, observability, lifecycle, discovery, clusters."""

from llmd.runtime.cluster import Cluster, ClusterError, KubernetesCluster, PoolStatus
from llmd.runtime.config import ConfigError, StrictModel, load_config
from llmd.runtime.discovery import Endpoint, KubernetesPodDiscovery, StaticFileDiscovery
from llmd.runtime.lifecycle import Health, ServiceRunner, health_router, run_service
from llmd.runtime.observability import render_metrics, setup_logging, setup_tracing

__all__ = [
    "Cluster",
    "ClusterError",
    "ConfigError",
    "Endpoint",
    "Health",
    "KubernetesCluster",
    "KubernetesPodDiscovery",
    "PoolStatus",
    "ServiceRunner",
    "StaticFileDiscovery",
    "StrictModel",
    "health_router",
    "load_config",
    "render_metrics",
    "run_service",
    "setup_logging",
    "setup_tracing",
]
