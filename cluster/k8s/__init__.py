"""Kubernetes: Kubeflow PyTorchJob manifests for training runs, and the kubectl wrappers."""
