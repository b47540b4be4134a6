"""Model store: content-addressed pieces on disk, manifests and names, import, reading ranges back."""
