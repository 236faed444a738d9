"""The proxy data path: listeners in pod namespaces, destination resolution, byte relay."""
