"""A many-host tabby fabric on one machine, for the demo and the tests. Never needed in production."""
