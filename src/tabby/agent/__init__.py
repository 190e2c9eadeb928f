"""The per-host agent: watch the Store, calculate this host's desired state, drive reconcilers."""
