"""The self-hosted cloud: registry, PKI, broker, shadows, deployments, lake, ML."""
