"""The box under the replicas: worker process trees, cgroups, the account workers run as, replica logs, pre-start actions, NVML, who listens on a port, CPU weight."""
