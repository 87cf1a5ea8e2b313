"""One module per method family, each building (E, F, D) growth maps over a schema and applying them."""
