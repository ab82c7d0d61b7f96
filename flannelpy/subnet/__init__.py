"""Subnet leases: the lease values, the etcd registry behind a small protocol, the manager, the watcher."""
