"""Reconcilers: each owns one kind of kernel or daemon state and never reads the Store."""
