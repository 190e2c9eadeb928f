"""The tabby CNI plugin (filled by the CNI issue)."""
