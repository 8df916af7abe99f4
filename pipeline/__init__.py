"""Images -> aligned token-activation stores (manifest, backbone registry, extract, store)."""
