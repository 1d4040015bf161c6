"""What the tests share, as `globus_sdk.testing` shares its cases: named identities, registry
entries, one scriptable compute backend, batch lines. Tests import from here, never from one
another, and never copy a fake."""
